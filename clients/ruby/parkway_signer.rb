# frozen_string_literal: true

# ParkwaySigner: sign Parkway / Signway `SW1-HMAC-SHA256` URLs from Ruby (Rails) with the
# standard library only. Copy this file into your app (e.g. lib/parkway_signer.rb).
#
#   url = ParkwaySigner.sign_url(
#     id: "my-app", secret: ENV.fetch("PARKWAY_MY_APP_SECRET"),
#     host: "https://example.com/ai",                         # where browsers reach Parkway
#     proxy_url: "https://api.openai.com/v1/chat/completions",
#     expiry: 300, method: "POST",
#     headers: { "Content-Type" => "application/json" },      # optional: must be sent exactly so
#     body: json_text,                                        # optional: pins the exact body
#     params: { "user" => current_user.id.to_s },             # optional: extra signed parameters
#     traceparent: ParkwaySigner.current_traceparent,         # optional: Parkway's spans join this trace
#   )
#
# `traceparent:` signs the W3C trace context of the Rails action as `pw_traceparent`, so
# Parkway's spans (when it exports traces) are children of the action that signed the URL;
# `current_traceparent` reads it from opentelemetry-ruby when that is loaded (nil otherwise).
#
# It produces byte for byte the URL of Parkway's Python signer (`proxy.signing.sign_url`)
# for the same inputs (tests/e2e/test_ruby.py checks a table of them):
# - the proxy URL is normalised first (lower-case scheme and host, default port dropped,
#   empty path -> "/", dot segments resolved, unsafe characters percent-encoded), which is
#   also the form Signway's own server signs, so these URLs verify there too;
# - query values are form-encoded (space as "+"), extra `params` come after the X-Sw ones;
# - a body (even "") is signed with Content-Length = its size in bytes, added last to the
#   signed headers; `body: nil` signs no body.
#
# Known differences from the Python normaliser, all for exotic proxy URLs only:
# - internationalised host names (non-ASCII) are refused: write them in punycode (xn--...);
# - surrounding whitespace is stripped with Ruby's `strip` (ASCII whitespace and NUL), where
#   Python also strips other Unicode spaces.
require "openssl"
require "time"

module ParkwaySigner
  ALGORITHM = "SW1-HMAC-SHA256"
  LONG_DATETIME = "%Y%m%dT%H%M%SZ"
  DEFAULT_PORTS = { "http" => 80, "https" => 443 }.freeze

  # Characters percent-encoded in each URL part, besides controls, space and non-ASCII
  # (the WHATWG URL Standard's path, special-query and fragment sets).
  PATH_UNSAFE = " \"#<>?`{}"
  QUERY_UNSAFE = " \"#<>'"
  FRAGMENT_UNSAFE = " \"<>`"
  USERINFO_UNSAFE = " @/:"
  HOST_FORBIDDEN = /[\s<>"^`{|}%]/.freeze

  TRACEPARENT = /\A[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\z/.freeze
  TRACEPARENT_PARAM = "pw_traceparent"

  class InvalidURL < ArgumentError; end

  module_function

  # The signed URL, as a String. `now` is the signing time (any offset; it is converted to UTC).
  def sign_url(id:, secret:, host:, proxy_url:, expiry:, method:, headers: {}, body: nil, params: {},
               traceparent: nil, now: Time.now.utc)
    unless traceparent.nil?
      raise ArgumentError, "traceparent must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)" unless
        TRACEPARENT.match?(traceparent.to_s)

      params = (params || {}).merge(TRACEPARENT_PARAM => traceparent.to_s)
    end
    host = utf8(host)
    host += "/" unless host.end_with?("/")
    date = now.getutc.strftime(LONG_DATETIME)
    day = date[0, 8]

    signed = (headers || {}).map { |name, value| [utf8(name), utf8(value)] }
    body_bytes = body.nil? ? nil : bytes_of(body)
    unless body_bytes.nil?
      signed = signed.reject { |name, _| name.downcase == "content-length" }
      signed << ["Content-Length", body_bytes.bytesize.to_s]
    end

    query = [
      ["X-Sw-Algorithm", ALGORITHM],
      ["X-Sw-Credential", "#{utf8(id)}/#{day}"],
      ["X-Sw-Date", date],
      ["X-Sw-Expires", Integer(expiry).to_s],
      ["X-Sw-Proxy", normalize_url(proxy_url)],
      # In the caller's order, as Parkway's signer writes it; the canonical form sorts them.
      ["X-Sw-SignedHeaders", signed.map { |name, _| name.downcase.strip }.join(";")],
      ["X-Sw-Body", body_bytes.nil? ? "false" : "true"],
      *(params || {}).map { |key, value| [utf8(key), utf8(value)] },
    ]
    encoded = query.map { |key, value| "#{form_encode(key)}=#{form_encode(value)}" }
    unsigned = "#{host}?#{encoded.join('&')}"

    canonical = canonical_request(
      method.to_s.upcase, percent_encode(url_path(host), "/"), encoded.sort.join("&"), signed, body_bytes || "".b
    )
    "#{unsigned}&X-Sw-Signature=#{signature(secret, date, canonical)}"
  end

  # The W3C traceparent of the current OpenTelemetry span (opentelemetry-ruby), or nil when
  # OpenTelemetry is not loaded or no span is recording.
  def current_traceparent
    return nil unless defined?(::OpenTelemetry::Trace)

    context = ::OpenTelemetry::Trace.current_span.context
    return nil unless context.valid?

    "00-#{context.hex_trace_id}-#{context.hex_span_id}-#{context.trace_flags.sampled? ? '01' : '00'}"
  end

  # METHOD, path, query, header block, blank line, header names, body: see docs/signing.md.
  def canonical_request(method, path, query, headers, body)
    # As every SDK and Parkway's canonical_headers do it: the "name:value" lines sorted as
    # whole strings, the names sorted separately ("accept-language:" sorts before "accept:").
    block = headers.map { |name, value| "#{name.downcase}:#{value.strip}" }.sort.join("\n")
    names = headers.map { |name, _| name.downcase }.sort.join(";")
    "#{method}\n#{path}\n#{query}\n#{block}\n\n#{names}\n".b + body
  end

  def signature(secret, date, canonical)
    day = date[0, 8]
    key = OpenSSL::HMAC.digest("SHA256", "#{ALGORITHM}#{utf8(secret)}".b, day)
    to_sign = "#{ALGORITHM}\n#{date}\n#{day}\n#{OpenSSL::Digest::SHA256.hexdigest(canonical)}"
    OpenSSL::HMAC.hexdigest("SHA256", key, to_sign)
  end

  # --- encodings ----------------------------------------------------------------------------

  # Python's quote_plus(s, safe=""): keep A-Z a-z 0-9 _ . - ~, space as "+", the rest %XX.
  def form_encode(text)
    utf8(text).b.gsub(/[^A-Za-z0-9_.~ -]/n) { |c| format("%%%02X", c.ord) }.tr(" ", "+").force_encoding(Encoding::US_ASCII)
  end

  # Python's quote(s, safe=extra): like form_encode, but space is %20 and `extra` stays.
  def percent_encode(text, extra = "")
    keep = Regexp.escape(extra)
    utf8(text).b.gsub(/[^A-Za-z0-9_.~#{keep}-]/n) { |c| format("%%%02X", c.ord) }.force_encoding(Encoding::US_ASCII)
  end

  # --- the proxy URL, normalised as proxy/urls.py normalize_url does ------------------------

  def normalize_url(text)
    text = utf8(text).strip
    head, mark, rest = text.partition("?")
    text = head.tr("\\", "/") + mark + rest # WHATWG: a backslash before the query is a slash
    scheme, netloc, path, query, fragment = split_url(text.delete("\t\r\n"))
    scheme = scheme.to_s.downcase
    raise InvalidURL, "scheme of #{text.inspect} is not one of http, https" unless DEFAULT_PORTS.key?(scheme)

    userinfo, at, hostinfo = netloc.rpartition("@")
    userinfo, hostinfo = nil, netloc if at.empty?
    host, port = host_and_port(hostinfo, text)
    authority = port.nil? || port == DEFAULT_PORTS[scheme] ? host : "#{host}:#{port}"
    unless userinfo.nil?
      user, colon, password = userinfo.partition(":")
      credentials = escape(user, USERINFO_UNSAFE)
      credentials += ":#{escape(password, USERINFO_UNSAFE)}" unless colon.empty?
      authority = "#{credentials}@#{authority}"
    end
    escaped_path = escape(path, PATH_UNSAFE)
    url = "#{scheme}://#{authority}#{remove_dot_segments(escaped_path.empty? ? '/' : escaped_path)}"
    url += "?#{escape(query.to_s, QUERY_UNSAFE)}" if text.split("#", 2).first.include?("?")
    url += "##{escape(fragment, FRAGMENT_UNSAFE)}" unless fragment.to_s.empty?
    url
  end

  # [scheme, netloc, path, query, fragment] the way Python's urlsplit cuts an absolute URL.
  def split_url(text)
    match = /\A([A-Za-z][A-Za-z0-9+.-]*):(.*)\z/m.match(text)
    raise InvalidURL, "cannot parse URL #{text.inspect}" if match.nil?

    scheme, rest = match[1], match[2]
    netloc = ""
    if rest.start_with?("//")
      rest = rest[2..]
      cut = rest.index(%r{[/?#]}) || rest.length
      netloc, rest = rest[0, cut], rest[cut..]
    end
    rest, _, fragment = rest.partition("#")
    path, mark, query = rest.partition("?")
    [scheme, netloc, path, mark.empty? ? nil : query, fragment]
  end

  def host_and_port(hostinfo, text)
    _, bracket, bracketed = hostinfo.partition("[")
    if bracket.empty?
      host, _, port = hostinfo.partition(":")
    else
      host, _, after = bracketed.partition("]")
      _, _, port = after.partition(":")
    end
    host = host.downcase
    raise InvalidURL, "no host in #{text.inspect}" if host.empty?

    if host.include?(":")
      host = "[#{host}]" # IPv6 literal
    elsif !host.ascii_only?
      raise InvalidURL, "internationalised host in #{text.inspect}: write it in punycode (xn--)"
    elsif host.match?(HOST_FORBIDDEN)
      raise InvalidURL, "invalid character in the host of #{text.inspect}"
    end
    return [host, nil] if port.empty?
    raise InvalidURL, "invalid port in #{text.inspect}" unless port.match?(/\A[0-9]+\z/) && port.to_i <= 65_535

    [host, port.to_i]
  end

  def escape(text, unsafe)
    text.each_char.map do |c|
      if unsafe.include?(c) || c.ord <= 0x20 || c.ord >= 0x7F
        c.b.each_byte.map { |byte| format("%%%02X", byte) }.join
      else
        c
      end
    end.join
  end

  # RFC 3986 5.2.4 on whole segments; "%2e" counts as a dot, as browsers treat it.
  def remove_dot_segments(path)
    segments = path.split("/", -1)
    out = []
    segments.each_with_index do |segment, i|
      last = i == segments.length - 1
      dots = segment.downcase.gsub("%2e", ".")
      if dots == "."
        out << "" if last
      elsif dots == ".."
        out.pop if out.length > 1
        out << "" if last
      else
        out << segment
      end
    end
    result = out.join("/")
    result.start_with?("/") ? result : "/#{result}"
  end

  # The path part of a base URL such as "https://example.com/ai/" (Python's urlsplit().path).
  def url_path(url)
    _, _, path, = split_url(url)
    path.empty? ? "/" : path
  end

  # --- text ------------------------------------------------------------------------------------

  def utf8(value)
    value.to_s.encode(Encoding::UTF_8)
  end

  # A String body is sent as UTF-8; a binary (ASCII-8BIT) String is taken as the exact bytes.
  def bytes_of(body)
    body.encoding == Encoding::BINARY ? body.b : body.encode(Encoding::UTF_8).b
  end
end
