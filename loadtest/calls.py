"""Python function calls per request: a deterministic figure, where CPU time is a noisy one.

``python -m loadtest.calls MODULE [ARGS...]`` runs ``python -m MODULE ARGS...`` (``proxy serve
--config FILE``, or ``loadtest.floor ...``) with a cProfile profiler that SIGUSR1 switches on and
SIGUSR2 switches off, writing its stats to ``$CALLS_OUT``: start-up and warm-up are not counted.
The runner (``--profile calls``) has the load generator drain its requests and send both signals
at the edges of the measured window (``loadgen small --signal-pid``), so every profiled call
belongs to a request it counted, and divides.

``python -m loadtest.calls --summary FILE.prof --requests N`` prints the per-request figures of
a written profile again: calls in all, by component (``loadtest.profile``'s grouping; a built-in
such as ``bytes.lower`` counts for the component that called it) and the functions called most.

The count moves by well under 1% between runs on a busy machine, so it compares two versions
where CPU time cannot; a cut in calls is a cut in CPU only if the calls it removes were not
replaced by heavier ones.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import runpy
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .profile import component

BUILTIN = "~"  # cProfile's file name for built-in functions and methods


def summarise(path: str | Path, requests: int, top: int = 30) -> dict[str, Any]:
    """Calls per request in all, by component, of which built-ins, and the top functions."""
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    n = max(1, requests)
    by_component: Counter[str] = Counter()
    builtins = 0
    rows = []
    for (file, line, name), (_cc, calls, _tt, _ct, callers) in stats.items():
        if file == BUILTIN:
            builtins += calls
            attributed = 0
            for (caller_file, _l, _n), caller in callers.items():
                by_component[component(caller_file) if caller_file != BUILTIN else "built-in"] += caller[0]
                attributed += caller[0]
            by_component["built-in"] += calls - attributed  # called from C (none, usually)
            where = name
        else:
            by_component[component(file)] += calls
            where = f"{_short(file)}:{line} {name}"
        rows.append((calls, where))
    total = sum(calls for calls, _ in rows)
    rows.sort(key=lambda row: -row[0])
    return {
        "requests": requests,
        "calls_per_request": total / n,
        "builtin_calls_per_request": builtins / n,
        "calls_by_component": {k: v / n for k, v in by_component.most_common() if v},
        "top_calls": [(where, calls / n) for calls, where in rows[:top]],
    }


def _short(file: str) -> str:
    """``.../site-packages/trio/_core/_run.py`` → ``trio/_core/_run.py``, ``.../lib/python3.11/contextlib.py``
    → ``contextlib.py``; the repository's own files from their package (``proxy/...``, ``loadtest/...``)."""
    file = re.sub(r"^.*/lib/python3\.\d+/", "", file.split("site-packages/")[-1])
    for package in ("/proxy/", "/loadtest/"):
        if package in file:
            return package[1:] + file.rsplit(package, 1)[-1]
    return file


def text(summary: dict[str, Any], title: str = "") -> str:
    out = [
        f"{title}python function calls per request: {summary['calls_per_request']:,.0f} "
        f"({summary['requests']:,} requests; built-ins {summary['builtin_calls_per_request']:,.0f} of them)",
        "",
        "by component (a built-in counts for its caller's):",
    ]
    out += [f"  {v:8.1f}  {k}" for k, v in summary["calls_by_component"].items()]
    out += ["", "most called:"]
    out += [f"  {v:8.1f}  {where}" for where, v in summary["top_calls"]]
    return "\n".join(out) + "\n"


def run_module(module: str, argv: list[str], out: str) -> None:
    """``python -m module argv...`` with the signal-switched profiler; stats to ``out`` on SIGUSR2."""
    profiler = cProfile.Profile()

    def start(*_: Any) -> None:
        profiler.enable()

    def stop(*_: Any) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] != "--summary" and not argv[0].startswith("-h"):
        run_module(argv[0], argv[1:], os.environ.get("CALLS_OUT", "calls.prof"))
        return 0
    parser = argparse.ArgumentParser(prog="python -m loadtest.calls", description=__doc__.split("\n")[0])
    parser.add_argument("--summary", required=True, metavar="FILE.prof")
    parser.add_argument("--requests", type=int, required=True, help="requests served while it profiled")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    print(text(summarise(args.summary, args.requests, args.top)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
