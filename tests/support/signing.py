"""The test credential's secrets and one signer for every test that needs a signed URL."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal

import signway_sdk

from proxy.signing import sign_url as parkway_sign_url

SECRET = "s3cret"
UPSTREAM_KEY = "sk-upstream-key"
INJECTED = (("Authorization", f"Bearer {UPSTREAM_KEY}"),)

Signer = Literal["signway_sdk", "proxy.signing"]
SIGNERS: tuple[Signer, ...] = ("signway_sdk", "proxy.signing")


def sign(
    base: str,
    proxy_url: str,
    *,
    signer: Signer = "signway_sdk",
    id: str = "app",
    secret: str = SECRET,
    method: str = "GET",
    expiry: int = 60,
    headers: Mapping[str, str] | None = None,
    body: str | None = None,
    params: Mapping[str, str] | None = None,
    when: datetime | None = None,
) -> str:
    """A URL for the Parkway reached at ``base`` (the signer's ``host``), signed for ``proxy_url``.

    ``signer`` is the real Python ``signway_sdk`` (it adds Content-Length to ``headers``
    itself) or Parkway's own ``proxy.signing.sign_url``, which alone signs extra ``params``
    (``pw_user``, ``pw_single_use``).
    """
    # Always given: the SDK's own default calls the deprecated datetime.utcnow().
    when = when or datetime.now(UTC)
    if signer == "signway_sdk":
        if params:
            raise ValueError("signway_sdk signs no extra params: use signer='proxy.signing'")
        return signway_sdk.sign_url(
            id=id, secret=secret, host=base, proxy_url=proxy_url, expiry=expiry, method=method,
            headers=dict(headers) if headers else None, body=body, datetime_override=when,
        )  # fmt: skip
    return parkway_sign_url(
        id=id, secret=secret, host=base, proxy_url=proxy_url, expiry=expiry, method=method,
        headers=dict(headers) if headers else None, body=body, params=dict(params) if params else None,
        datetime_override=when,
    )  # fmt: skip
