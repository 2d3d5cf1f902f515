"""What ``parkway serve`` flags change in a configuration, applied in one place.

The same :meth:`ConfigOverrides.apply` runs at start and at every reload (SIGHUP, ``POST
/reload``), so a flag given on the command line never falls away when the file is re-read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import AdminConfig, Config


@dataclass(frozen=True, slots=True)
class ConfigOverrides:
    """Command-line values that win over the file's; ``None``/empty/False leave the file's."""

    listen: tuple[str, ...] = ()  # --listen (repeatable)
    admin: tuple[str, ...] | None = None  # --admin
    allow_private_upstreams: bool = False  # --allow-private-upstreams
    log_format: str | None = None  # --log-format
    http: str | None = None  # --http (auto | h11 | httptools)

    def apply(self, config: Config) -> Config:
        server = config.server
        if self.allow_private_upstreams:
            server = replace(server, allow_private_upstreams=True)
        if self.listen:
            server = replace(server, listen=self.listen)
        if self.http is not None:
            server = replace(server, http=self.http)
        config = replace(config, server=server)
        if self.admin is not None:
            config = replace(config, admin=AdminConfig(listen=self.admin))
        if self.log_format is not None:
            config = replace(config, log=replace(config.log, format=self.log_format))
        return config
