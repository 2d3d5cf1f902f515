"""Run ``parkway`` with tracemalloc on; SIGUSR1 writes where the live memory is, by component.

``python -m loadtest.tracemem serve --config FILE`` is ``parkway serve --config FILE`` with
``tracemalloc`` tracing from the first import. On SIGUSR1 it writes to ``$TRACEMEM_OUT``
(default ``tracemem.txt``) the live Python allocations grouped by component (h11, httpcore,
trio...) and by line, and their count. The runner sends the signal while every stream is
parked (``--profile tracemalloc``); dividing by the stream count gives bytes per stream.
Kernel socket buffers are not RSS and do not show here; allocator overhead and fragmentation
(RSS minus traced) do not either, so the report also gives the RSS at that moment.
"""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc

tracemalloc.start(1)


def _component(filename: str) -> str:
    from .profile import component

    name = component(filename)
    if name.startswith("stdlib") or name == "other (native/idle)":
        return "stdlib/other: " + os.path.basename(filename)
    return name


_baseline: list[tracemalloc.Snapshot] = []


def dump(*_args) -> None:
    """First signal: remember the idle snapshot. Later ones: write what grew since, per component."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    if not _baseline:
        _baseline.append(snapshot)
        return
    out = os.environ.get("TRACEMEM_OUT", "tracemem.txt")
    try:
        with open(out + ".streams") as file:
            streams = int(file.read())
    except (OSError, ValueError):
        streams = 0
    diffs = snapshot.compare_to(_baseline[0], "lineno")
    by_component: dict[str, list[int]] = {}
    for diff in diffs:
        name = _component(diff.traceback[0].filename)
        entry = by_component.setdefault(name, [0, 0])
        entry[0] += diff.size_diff
        entry[1] += diff.count_diff
    total = sum(size for size, _ in by_component.values())
    per = (lambda n: f"{n / streams:9.0f}") if streams else (lambda n: "        –")
    with open(f"/proc/{os.getpid()}/status") as file:
        rss = next((int(line.split()[1]) * 1024 for line in file if line.startswith("VmRSS:")), 0)
    lines = [
        f"Python allocations that grew since idle: {total} bytes for {streams or '?'} parked streams "
        f"({per(total).strip()} bytes/stream); RSS now {rss} bytes (RSS also holds allocator slack)",
        "",
        "   bytes/stream  blocks/stream  component",
    ]
    for name, (size, count) in sorted(by_component.items(), key=lambda kv: -kv[1][0])[:25]:
        blocks = f"{count / streams:9.1f}" if streams else "        –"
        lines.append(f"      {per(size)}      {blocks}  {name}")
    lines += ["", "   bytes/stream  blocks/stream  line"]
    for diff in diffs[:40]:
        frame = diff.traceback[0]
        blocks = f"{diff.count_diff / streams:9.1f}" if streams else "        –"
        lines.append(f"      {per(diff.size_diff)}      {blocks}  {frame.filename}:{frame.lineno}")
    with open(out, "w") as file:
        file.write("\n".join(lines) + "\n")


def main() -> int:
    signal.signal(signal.SIGUSR1, dump)
    from proxy.cli import main as parkway

    return parkway(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
