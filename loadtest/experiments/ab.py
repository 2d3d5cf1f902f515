"""Interleaved A/B runs of copies of ``proxy/``: the numbers behind FINDINGS' experiment logs.

``python -m loadtest.experiments.ab --rounds 3 --out DIR NAME=PATH NAME=PATH ...`` runs, for
each round, ``python -m loadtest run --proxy-path PATH`` for every variant in turn (the order
alternates between rounds, so drift on a shared machine hits each alike), then prints the
medians per variant (and each round's value): CPU per small request, small req/s, CPU per
relayed event (relay workload, and while parked), RSS per parked stream, p50 latency of one
sequential client and, when ``--workload`` has ``pool``, req/s at 512 ÷ at 16 concurrent
upstream requests. Parkway only, no nginx.
Each PATH is a directory holding a ``proxy/`` package (a copy of this one with a change);
``NAME=PATH|ARGS`` adds runner arguments for that variant only (e.g. ``|--proxy-log warning``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FIGURES = [  # (label, workload, key in the run, format)
    ("small µs CPU/request", "small", "cpu_per_request_us", "{:,.0f}"),
    ("small req/s", "small", "rps", "{:,.0f}"),
    ("relay µs CPU/event", "relay", "cpu_per_event_us", "{:,.1f}"),
    ("parked µs CPU/event (steady)", "parked", "steady_cpu_per_event_us", "{:,.1f}"),
    ("parked KB RSS/stream", "parked", "rss_per_stream_kb", "{:,.1f}"),
    ("parked TTFE p99 ms", "parked", "ttfe_p99_ms", "{:,.0f}"),
    ("latency p50 µs", "latency", "latency_p50_us", "{:,.0f}"),
    ("pool req/s at 512 ÷ at 16", "pool", "ratio", "{:.2f}"),  # with --workload ...,pool
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.experiments.ab", description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", required=True, help="directory for every run's JSON")
    parser.add_argument("--workload", default="relay,small,latency,parked")
    parser.add_argument("--streams", default="1000", help="parked streams")
    parser.add_argument("--extra", default="", help="more arguments for `python -m loadtest run`")
    args = parser.parse_args(argv)
    variants = [tuple(v.split("=", 1)) for v in args.variants]
    variants = [(name, *spec.partition("|")[::2]) for name, spec in variants]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for name, path, own in order:
            label = f"{name}-r{r + 1}"
            if (out / f"{label}.json").exists():
                continue  # resume an interrupted series
            print(f"round {r + 1}: {name}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "loadtest", "run", "--workload", args.workload,
                            "--streams", args.streams, "--repeat", "1", "--no-reference", "--proxy-path", path,
                            "--out", str(out), "--label", label, "--no-chart", "--quiet", *args.extra.split(), *own.split()],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    print(summary(out, [name for name, *_ in variants], args.rounds))
    return 0


def summary(out: Path, names: list[str], rounds: int) -> str:
    values: dict[tuple[str, str], list[float]] = {}
    errors: dict[str, int] = {}
    for name in names:
        for r in range(rounds):
            path = out / f"{name}-r{r + 1}.json"
            if not path.exists():
                continue
            runs = json.loads(path.read_text())["runs"]
            pool = {r["clients"]: r["rps"] for r in runs if r["workload"] == "pool" and r["target"] == "parkway"}
            if len(pool) == 2 and min(pool.values()):
                runs.append({"workload": "pool", "target": "parkway", "ratio": pool[max(pool)] / pool[min(pool)]})
            for run in runs:
                if run["target"] != "parkway":
                    continue
                errors[name] = errors.get(name, 0) + (run.get("error_count") or 0)
                for label, workload, key, _ in FIGURES:
                    if run["workload"] == workload and run.get(key) is not None:
                        values.setdefault((name, label), []).append(run[key])
    lines = ["| figure (median of rounds) | " + " | ".join(names) + " |",
             "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for label, _, _, fmt in FIGURES:
        cells = []
        for name in names:
            vs = values.get((name, label), [])
            cells.append(fmt.format(statistics.median(vs)) + " [" + ", ".join(fmt.format(v) for v in vs) + "]"
                         if vs else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| errors (all runs) | " + " | ".join(str(errors.get(n, 0)) for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
