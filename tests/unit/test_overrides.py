"""proxy.overrides: the ``serve`` flags applied over a configuration, at start and at every reload."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.config import AdminConfig, Config, LogConfig, ServerConfig
from proxy.overrides import ConfigOverrides

FILE = Config(
    server=ServerConfig(listen=("127.0.0.1:3000",), allow_private_upstreams=False),
    admin=AdminConfig(listen=("127.0.0.1:9180",)),
    log=LogConfig(level="warning", format="json"),
)

CASES = {
    "nothing given": (ConfigOverrides(), FILE),
    "--listen": (ConfigOverrides(listen=("0.0.0.0:8080", "[::]:8080")),
                 replace(FILE, server=replace(FILE.server, listen=("0.0.0.0:8080", "[::]:8080")))),
    "--admin": (ConfigOverrides(admin=("127.0.0.1:9999",)), replace(FILE, admin=AdminConfig(listen=("127.0.0.1:9999",)))),
    "--allow-private-upstreams": (ConfigOverrides(allow_private_upstreams=True),
                                  replace(FILE, server=replace(FILE.server, allow_private_upstreams=True))),
    "--log-format": (ConfigOverrides(log_format="console"), replace(FILE, log=LogConfig(level="warning", format="console"))),
}  # fmt: skip


@pytest.mark.parametrize("overrides, expected", CASES.values(), ids=CASES.keys())
def test_each_flag_changes_its_field_only(overrides: ConfigOverrides, expected: Config) -> None:
    assert overrides.apply(FILE) == expected


@pytest.mark.parametrize("overrides", [o for o, _ in CASES.values()], ids=CASES.keys())
def test_applying_twice_changes_nothing_more(overrides: ConfigOverrides) -> None:
    # A reload applies the flags to a freshly read file; a config already carrying them is a fixed point.
    once = overrides.apply(FILE)
    assert overrides.apply(once) == once


def test_a_file_that_allows_private_upstreams_keeps_it_without_the_flag() -> None:
    allowing = replace(FILE, server=replace(FILE.server, allow_private_upstreams=True))
    assert ConfigOverrides().apply(allowing).server.allow_private_upstreams is True
