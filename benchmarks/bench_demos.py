"""Wall time of every sampler's bare demo (`gensample run --sampler S`, no other flag) and the
start-up time of `gensample --help`, `--version` and `list` (cold and warm registry cache).

    python benchmarks/bench_demos.py [--timeout 120] [--repeats 3] [--threads 2] [--only ddim,fkc]

Each command runs in a fresh process in a fresh temporary working folder (so every demo writes
its own default runs/ folder and resumes nothing). Start-up commands are repeated ``--repeats``
times, interleaved, and reported as median and spread (min-max); demos run once each (they take
seconds to a minute). Prints a Markdown table (docs/demos.md holds one). Timings depend on the
machine's load: measure on an idle machine for numbers to quote.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], cwd: str, env: dict, timeout: float) -> tuple[float, int | None, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, None, ""
    return time.perf_counter() - t0, proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:][0] if (proc.stdout + proc.stderr).strip() else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a demo is stopped and reported as > timeout")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each start-up command")
    ap.add_argument("--threads", type=int, default=2, help="OMP/torch threads per process (2: the README's 2-core machine)")
    ap.add_argument("--only", default=None, help="comma-separated samplers (default: every registered one)")
    args = ap.parse_args()

    exe = [sys.executable, "-m", "gensample"]
    work = tempfile.mkdtemp(prefix="gensample-bench-demos-")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", XDG_CACHE_HOME=os.path.join(work, "cache"))

    # start-up: the first `list` fills the registry cache (cold), later ones read it (warm)
    cold, rc, _ = timed([*exe, "list"], work, env, 300)
    startup: dict[str, list[float]] = {"--help": [], "--version": [], "list (warm cache)": []}
    for _ in range(args.repeats):
        for name, cmd in (("--help", ["--help"]), ("--version", ["--version"]), ("list (warm cache)", ["list"])):
            startup[name].append(timed([*exe, *cmd], work, env, 120)[0])
    listing = subprocess.run([*exe, "list"], cwd=work, env=env, capture_output=True, text=True).stdout
    section = listing.split("Zoo models:")[0].splitlines()[1:]
    samplers = [line.split()[0] for line in section if line.strip()]
    if args.only:
        samplers = [s for s in samplers if s in args.only.split(",")]

    rows = []
    for s in samplers:
        cwd = tempfile.mkdtemp(prefix=f"demo-{s}-", dir=work)
        wall, code, last = timed([*exe, "run", "--sampler", s], cwd, env, args.timeout)
        rows.append((s, wall, code, last))
        shown = f"{wall:6.1f} s" if code is not None else f"> {args.timeout:.0f} s (stopped)"
        print(f"# {s:<14} {shown}  exit {code}  {last[:100]}", file=sys.stderr, flush=True)

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"{args.threads} threads per process; python {platform.python_version()}\n")
    print("| command | wall time (median of %d) | spread |" % args.repeats)
    print("|---|---|---|")
    print(f"| `gensample list` (cold cache, imports every sampler) | {cold:.2f} s (1 run) | |")
    for name, ts in startup.items():
        print(f"| `gensample {name.split()[0]}`{' (warm cache)' if 'warm' in name else ''} | {statistics.median(ts):.2f} s | "
              f"{min(ts):.2f}-{max(ts):.2f} s |")
    print("\n| sampler | bare demo `gensample run --sampler S` | exit | output line |")
    print("|---|---|---|---|")
    for s, wall, code, last in rows:
        shown = f"{wall:.1f} s" if code is not None else f"> {args.timeout:.0f} s (stopped)"
        print(f"| `{s}` | {shown} | {code if code is not None else '-'} | {last.replace('|', '/')[:90]} |")
    slow = [s for s, wall, code, _ in rows if code is None or wall >= 60]
    failed = [s for s, _, code, _ in rows if code not in (0, None)]
    print(f"\nover 60 s: {slow or 'none'}; failed: {failed or 'none'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
