"""``parkway`` command line: serve, sign, check-config, demo.

``parkway serve ID SECRET --header "Name: value"`` takes Signway's own arguments (and its
``$PORT``), so a Signway user switches by changing the command name only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import __version__, logs
from .config import Config, config_from_dict, config_warnings, kept_per_process, load_config
from .errors import ConfigError, ParkwayError
from .overrides import ConfigOverrides
from .urls import split_host_port

# Flags that only Signway's command line (ID SECRET) takes: with --config they would be ignored.
SIGNWAY_ONLY_FLAGS = {
    "header": "--header",
    "access_control_allow_origin": "--access-control-allow-origin",
    "access_control_allow_methods": "--access-control-allow-methods",
    "access_control_allow_headers": "--access-control-allow-headers",
}


def _header_pairs(values: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            # Never echo the argument: a forgotten colon would print the API key.
            parser.error('invalid --header: expected "Name: value" (the value is not shown here)')
        headers[name.strip()] = value.strip()
    return headers


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def signway_compat_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    """The config Signway's command line implies: one credential, ``0.0.0.0:$PORT``."""
    listen = args.listen or [f"0.0.0.0:{os.environ.get('PORT', '3000')}"]
    data: dict = {
        "server": {"listen": listen},
        "credentials": [{"id": args.id, "secret": args.secret, "headers": _header_pairs(args.header, parser)}],
    }
    cors = {}
    for key, value in (
        ("allow_origins", _csv(args.access_control_allow_origin)),
        ("allow_methods", _csv(args.access_control_allow_methods)),
        ("allow_headers", _csv(args.access_control_allow_headers)),
    ):
        if value is not None:
            cors[key] = value
    if cors:
        data["cors"] = cors
    if args.log_format:
        data["log"] = {"format": args.log_format}
    # Signway has no admin port: open one only when asked, so a drop-in never collides.
    data["admin"] = {"listen": [args.admin] if args.admin else []}
    return config_from_dict(data, os.environ)


def command_line_overrides(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ConfigOverrides:
    """The ``serve`` flags that override a configuration, checked here so a typo fails at once."""
    if args.http == "httptools" and importlib.util.find_spec("httptools") is None:
        parser.error("--http httptools: httptools is not installed (pip install 'parkway[fast]')")
    for flag, values in (("--listen", args.listen or []), ("--admin", [args.admin] if args.admin else [])):
        for address in values:
            try:
                split_host_port(address)
            except ValueError as exc:
                parser.error(f"{flag}: {exc}")
    return ConfigOverrides(
        listen=tuple(args.listen or ()),
        admin=(args.admin,) if args.admin else None,
        allow_private_upstreams=args.allow_private_upstreams,
        log_format=args.log_format,
        http=args.http,
    )


def serve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Config, ConfigOverrides]:
    """The configuration ``serve`` starts with, and the flags every reload applies again.

    Raises :class:`ConfigError` for a bad file; a bad flag is a usage error (exit 2).
    """
    if args.config:
        if args.id or args.secret:
            parser.error("give either --config FILE or ID SECRET, not both")
        for dest, flag in SIGNWAY_ONLY_FLAGS.items():
            if getattr(args, dest):
                parser.error(f"{flag} is for Signway's command line (ID SECRET); with --config, set it in the file")
        overrides = command_line_overrides(args, parser)
        return overrides.apply(load_config(args.config)), overrides
    if not (args.id and args.secret):
        parser.error("serve needs --config FILE, or ID and SECRET like Signway")
    overrides = command_line_overrides(args, parser)
    return overrides.apply(signway_compat_config(args, parser)), overrides


def _print_problems(source: str, exc: ConfigError) -> None:
    for problem in exc.problems:
        print(f"{source}: {problem}", file=sys.stderr)


def _run_trio(fn: Callable[..., Awaitable[int | None]], *args: Any) -> int:
    """``trio.run`` for a command: an OSError (address in use...) is one line, exit status 1."""
    import trio

    try:
        with logs.turn_batches() as instruments:
            result = trio.run(fn, *args, instruments=instruments)
    except OSError as exc:
        print(f"parkway: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        matched, rest = group.split(OSError)
        if rest is not None or matched is None:
            raise
        for error in matched.exceptions:
            print(f"parkway: {error}", file=sys.stderr)
        return 1
    return result or 0


def cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .app import Parkway, run_until_signalled

    try:
        config, overrides = serve_config(args, parser)
    except ConfigError as exc:
        _print_problems(args.config or "command line", exc)
        return 1
    logs.configure(config.log.level, config.log.format)
    if args.workers > 1:
        from .supervisor import Supervisor, warn_kept_per_worker

        warn_kept_per_worker(args.workers, kept_per_process(config))

        worker_argv = [
            [sys.executable, "-m", "proxy", *_without_workers(args.argv), "--worker-index", str(i)]
            for i in range(args.workers)
        ]
        return _run_trio(Supervisor(worker_argv, config.server.drain_timeout).run)
    if args.worker_index is not None:
        import structlog

        structlog.contextvars.bind_contextvars(worker=args.worker_index)
    parkway = Parkway(
        config,
        config_path=args.config,
        overrides=overrides,
        worker_index=args.worker_index or 0,
        reuse_port=args.worker_index is not None,
    )
    return _run_trio(run_until_signalled, parkway)


def _without_workers(argv: Sequence[str]) -> list[str]:
    """The serve arguments a worker gets: the supervisor's own, minus ``--workers N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def cmd_sign(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .signing import sign_url
    from .urls import InvalidURL

    secret = args.secret
    if not secret and args.secret_env:
        secret = os.environ.get(args.secret_env)
        if secret is None:
            parser.error(f"--secret-env: {args.secret_env} is not set")
        if not secret:
            parser.error(f"--secret-env: {args.secret_env} is empty")
    if not secret:
        parser.error("a secret is needed: --secret or --secret-env NAME")
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"invalid --param {item!r}: expected key=value")
        params[key] = value
    if args.traceparent:
        from .telemetry.model import TRACEPARENT_PARAM, parse_traceparent

        if parse_traceparent(args.traceparent) is None:
            parser.error(f"invalid --traceparent {args.traceparent!r}: expected 00-<32 hex>-<16 hex>-<2 hex>")
        params[TRACEPARENT_PARAM] = args.traceparent.strip()
    try:
        url = sign_url(
            id=args.id,
            secret=secret,
            host=args.host,
            proxy_url=args.proxy,
            expiry=args.expiry,
            method=args.method,
            headers=_header_pairs(args.header, parser) or None,
            body=args.body,
            params=params or None,
        )
    except InvalidURL as exc:
        parser.error(f"--proxy: {exc}")
    print(url)
    return 0


def cmd_reload(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Ask a running Parkway to re-read its TOML: SIGHUP to a pid, or POST /reload to its admin."""
    if args.pid:
        import signal

        try:
            os.kill(args.pid, signal.SIGHUP)
        except OSError as exc:
            print(f"parkway reload: cannot signal {args.pid}: {exc}", file=sys.stderr)
            return 1
        print(f"sent SIGHUP to {args.pid}; its log says whether the new file was taken")
        return 0
    import httpx2 as httpx

    try:
        response = httpx.post(f"http://{args.admin}/reload", timeout=10, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"parkway reload: cannot reach the admin listener at {args.admin}: {exc}", file=sys.stderr)
        return 1
    result = response.json()
    if response.status_code == 200:
        print("reloaded")
        return 0
    for problem in result.get("problems", []):
        print(problem, file=sys.stderr)
    print("reload refused; the running configuration is unchanged", file=sys.stderr)
    return 1


def cmd_check_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        _print_problems(args.file, exc)
        print(f"{args.file}: {len(exc.problems)} problem(s); Parkway would refuse to start", file=sys.stderr)
        return 1
    for warning in config_warnings(config):
        print(f"{args.file}: {warning}", file=sys.stderr)
    ids = ", ".join(c.id for c in config.credentials) or "none"
    print(f"{args.file}: OK (listen {', '.join(config.server.listen)}; credentials: {ids})")
    return 0


def cmd_budget_show(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Spent, held and remaining of a credential's budgets (and a user's), from the shared state."""
    from datetime import UTC, datetime

    from .limits import budget_report

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _print_problems(args.config, exc)
        return 1

    async def show() -> int:
        try:
            lines = await budget_report(config, args.credential, args.user, datetime.now(UTC))
        except ValueError as exc:
            print(f"parkway: {exc}", file=sys.stderr)
            return 1
        except ParkwayError as exc:  # Redis unreachable
            print(f"parkway: {exc.message}", file=sys.stderr)
            return 1
        print("\n".join(lines))
        return 0

    return _run_trio(show)


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .demo.run import run_demo

    logs.configure("info" if args.verbose else "warning", "console")
    return _run_trio(run_demo, args.port, args.once, args.delay)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parkway", description="Signed-URL reverse proxy for LLM APIs, on Trio.")
    parser.add_argument("--version", action="version", version=f"parkway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy (from --config FILE, or Signway's ID SECRET arguments)")
    serve.add_argument("id", nargs="?", help="access id that signs URLs for this server (Signway mode)")
    serve.add_argument("secret", nargs="?", help="secret of that id (Signway mode)")
    serve.add_argument("--config", "-c", help="TOML configuration file")
    serve.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'Name: value'",
        help="header added to every forwarded request (repeatable)",
    )
    serve.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="listen address (repeatable); default 0.0.0.0:$PORT, PORT defaulting to 3000",
    )
    serve.add_argument("--access-control-allow-origin")
    serve.add_argument("--access-control-allow-methods")
    serve.add_argument("--access-control-allow-headers")
    serve.add_argument(
        "--allow-private-upstreams",
        action="store_true",
        help="allow upstreams on loopback/private/link-local addresses (metadata stays refused)",
    )
    serve.add_argument("--no-bytes-monitor", action="store_true", help="accepted for Signway compatibility")
    serve.add_argument("--log-format", choices=["json", "console"])
    serve.add_argument(
        "--http",
        choices=["auto", "h11", "httptools"],
        help="request-head parser: httptools when installed (auto, the default), or h11",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N worker processes sharing the port (SO_REUSEPORT), restarted if they die",
    )
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="admin listener (health, metrics, reload); replaces [admin] listen of a TOML file",
    )
    serve.set_defaults(func=cmd_serve)

    sign = sub.add_parser("sign", help="print a signed URL")
    sign.add_argument("--id", required=True)
    sign.add_argument("--secret")
    sign.add_argument("--secret-env", metavar="NAME", help="read the secret from this environment variable")
    sign.add_argument("--proxy", required=True, help="upstream URL the request is forwarded to")
    sign.add_argument("--method", default="POST")
    sign.add_argument("--expiry", type=int, default=300, help="seconds the URL stays valid (default 300)")
    sign.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'Name: value'",
        help="header the client must send with this exact value (repeatable)",
    )
    sign.add_argument("--body", help="exact request body to sign")
    sign.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra signed query parameter (repeatable): pw_user=42, pw_single_use=1, pw_cache=86400 (seconds)",
    )
    sign.add_argument(
        "--traceparent",
        default=os.environ.get("TRACEPARENT"),
        metavar="00-TRACE-SPAN-FLAGS",
        help="W3C trace context Parkway's spans are parented to, signed as pw_traceparent (default $TRACEPARENT)",
    )
    sign.add_argument(
        "--host",
        default=os.environ.get("PARKWAY_URL", "http://127.0.0.1:3000"),
        help="Parkway's public base URL (default $PARKWAY_URL or http://127.0.0.1:3000)",
    )
    sign.set_defaults(func=cmd_sign)

    reload = sub.add_parser("reload", help="make a running Parkway re-read its configuration file")
    target = reload.add_mutually_exclusive_group()
    target.add_argument(
        "--admin", default="127.0.0.1:9180", metavar="HOST:PORT", help="its admin listener (default 127.0.0.1:9180)"
    )
    target.add_argument("--pid", type=int, help="send SIGHUP to this process (a worker or the supervisor)")
    reload.set_defaults(func=cmd_reload)

    check = sub.add_parser("check-config", help="validate a TOML file and list every problem")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    budget = sub.add_parser("budget", help="budgets kept in the shared state (Redis)")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)
    show = budget_sub.add_parser("show", help="spent, held and remaining of a credential's (and a user's) budgets")
    show.add_argument("--credential", required=True, metavar="ID")
    show.add_argument("--user", metavar="U", help="also the user_budget of this end user")
    show.add_argument("--config", "-c", default="parkway.toml", help="TOML configuration file (default parkway.toml)")
    show.set_defaults(func=cmd_budget_show)

    demo = sub.add_parser("demo", help="Parkway plus a mock OpenAI upstream on loopback; no key, no internet")
    demo.add_argument("--once", action="store_true", help="send one signed request, show the stream, exit")
    demo.add_argument("--port", type=int, default=0, help="Parkway's port (default: any free port)")
    demo.add_argument("--delay", type=float, default=0.08, help="seconds between streamed words")
    demo.add_argument("--verbose", "-v", action="store_true", help="show Parkway's request log")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())
