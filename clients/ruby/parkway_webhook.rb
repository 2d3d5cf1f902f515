# frozen_string_literal: true

# ParkwayWebhook: verify Parkway's background-job deliveries (Standard Webhooks) in Ruby with
# the standard library only. Copy this file into your app (e.g. lib/parkway_webhook.rb).
#
#   class ParkwayHooksController < ActionController::API
#     def create
#       event = ParkwayWebhook.verify!(request.raw_post, request.headers, ENV.fetch("PARKWAY_WEBHOOK_SECRET"))
#       Summary.from_job!(event["data"]) unless Summary.exists?(webhook_id: request.headers["webhook-id"])
#       head :no_content
#     rescue ParkwayWebhook::VerificationError
#       head :bad_request
#     end
#   end
#
# A delivery carries `webhook-id` (the same on every retry: dedupe on it), `webhook-timestamp`
# (UNIX seconds) and `webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` of
# "id.timestamp.body", one per secret Parkway signs with (several while a secret is rotated).
# `verify!` accepts it when the timestamp is within `tolerance` seconds of now (an old delivery
# replayed is refused) and one signature matches the secret (or one of several secrets) given
# as "whsec_<base64>". It returns the parsed JSON payload, or raises VerificationError.
# `headers` may be Rails' request.headers, a Rack env, or any Hash (names in any case).
require "base64"
require "json"
require "openssl"

module ParkwayWebhook
  class VerificationError < StandardError; end

  TOLERANCE = 300
  SECRET_PREFIX = "whsec_"

  module_function

  def verify!(body, headers, secret, tolerance: TOLERANCE, now: Time.now)
    id = header(headers, "webhook-id")
    timestamp = header(headers, "webhook-timestamp")
    signatures = header(headers, "webhook-signature")
    unless id && timestamp && signatures
      raise VerificationError, "missing webhook-id, webhook-timestamp or webhook-signature"
    end
    raise VerificationError, "webhook-timestamp is not a UNIX time in seconds" unless timestamp.match?(/\A\d+\z/)

    age = now.to_i - Integer(timestamp, 10)
    raise VerificationError, "webhook-timestamp is more than #{tolerance} s old" if age > tolerance
    raise VerificationError, "webhook-timestamp is more than #{tolerance} s in the future" if age < -tolerance

    signed = [id, timestamp, body].map { |part| part.to_s.b }.join(".".b)
    expected = Array(secret).map do |s|
      Base64.strict_encode64(OpenSSL::HMAC.digest("SHA256", key(s), signed))
    end
    matched = signatures.split(" ").any? do |candidate|
      version, value = candidate.split(",", 2)
      version == "v1" && value && expected.any? { |e| e.bytesize == value.bytesize && OpenSSL.secure_compare(e, value) }
    end
    raise VerificationError, "no webhook-signature matches the body" unless matched

    JSON.parse(body)
  end

  # The HMAC key of "whsec_<base64>" (the prefix is optional).
  def key(secret)
    encoded = secret.delete_prefix(SECRET_PREFIX)
    Base64.strict_decode64(encoded + ("=" * (-encoded.length % 4)))
  rescue ArgumentError
    raise VerificationError, "the webhook secret is not whsec_ followed by base64"
  end

  def header(headers, name)
    direct = headers[name] if headers.respond_to?(:[])
    return direct if direct.is_a?(String) && !direct.empty?

    rack = "HTTP_#{name.upcase.tr('-', '_')}"
    headers.each do |key, value|
      k = key.to_s
      return value if k.casecmp?(name) || k == rack
    end
    nil
  end
end
