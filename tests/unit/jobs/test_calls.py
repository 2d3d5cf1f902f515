"""The HTTP calls of a job (proxy.jobs.calls): the callback address check, the injected headers.

The calls themselves run against real sockets in tests/test_jobrunner.py and test_jobs.py.
"""

from __future__ import annotations

import pytest

from proxy.config import Credential
from proxy.errors import Forbidden
from proxy.jobs.calls import callback_policy, check_callback_address
from proxy.upstream import ssrf

CRED = Credential("app", ("s",), allowed_callbacks=("http://10.0.0.7:3000/hooks/",))


def resolver_to(*addresses: str):
    async def resolve(host: str, port: int) -> list[str]:
        if not addresses:
            raise OSError("no such host")
        return list(addresses)

    return resolve


@pytest.mark.parametrize(
    ("url", "addresses", "refused"),
    [
        ("https://app.example.com/hooks/x", ("93.184.215.14",), False),  # public
        ("https://app.example.com/hooks/x", ("93.184.215.14", "127.0.0.1"), True),  # one private answer
        ("https://internal.example/hooks/x", ("10.1.2.3",), True),
        ("http://127.0.0.1:8000/hooks/x", (), True),  # a literal needs no lookup
        ("http://169.254.169.254/latest/", (), True),  # cloud metadata
        ("http://10.0.0.7:3000/hooks/x", (), False),  # listed in allowed_callbacks: allowed
        ("https://not-yet.example/hooks/x", (), False),  # does not resolve now: delivery decides
    ],
)
async def test_check_callback_address(url: str, addresses: tuple[str, ...], refused: bool) -> None:
    policy = callback_policy(CRED, allow_private=False)
    if not refused:
        await check_callback_address(url, policy, resolver_to(*addresses))
        return
    with pytest.raises(Forbidden) as caught:
        await check_callback_address(url, policy, resolver_to(*addresses))
    assert caught.value.code == "callback_address_refused"
    assert caught.value.message.startswith("callback ")


async def test_allow_private_upstreams_governs_callbacks_too() -> None:
    for policy in (callback_policy(CRED, allow_private=True),
                   callback_policy(Credential("a", ("s",), allow_private_upstreams=True), allow_private=False)):  # fmt: skip
        await check_callback_address("https://internal.example/h", policy, resolver_to("10.1.2.3"))
    assert callback_policy(CRED, allow_private=False) == ssrf.policy_for(
        allow_private=False, allowed_upstreams=CRED.allowed_callbacks
    )
