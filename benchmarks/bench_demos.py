"""Wall time of every sampler's bare demo (`gensample run --sampler S`, no other flag), idle and
beside ``--busy N`` busy processes, plus usage-error and start-up timings.

    python benchmarks/bench_demos.py --busy 3 --out benchmarks/results/demos.json
    python benchmarks/bench_demos.py --busy 3 --only ddim,dps          # two demos, print only

Each command runs in a fresh process in a fresh temporary working folder (so every demo writes
its own default runs/ folder and resumes nothing). Two phases: *idle* (nothing of ours beside the
command) and *loaded* (``--busy N`` processes of this script spinning on the CPU, started before
the phase and stopped at its end, also on Ctrl-C or an error). In both phases:

- usage errors (``gensample run --steps 0`` etc.): ``--repeats`` runs each, median and spread;
  the target is a median under 1 s (they are answered before torch is imported);
- start-up (``--help``, ``--version``, ``list``): median of ``--repeats``;
- every demo once (they take seconds to a minute); the target is under 60 s when loaded.

Threads: by default each demo uses gensample's own choice (``--threads auto``: one thread for
the small demo models); ``--threads N`` sets OMP_NUM_THREADS=N for every process instead.
Prints Markdown tables; ``--out FILE`` also writes them as JSON with provenance. Numbers depend on
the machine: run on a machine that nothing else is using, and quote the busy count.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULT_FIELDS = {"demos.json": ["busy", "threads", "cpu_count", "repeats", "usage_errors", "usage_error_median_s",
                                "startup", "demos", "over_60s_loaded", "failed"]}

USAGE_ERRORS = {  # name -> arguments of `gensample`; each must exit 2
    "run --steps 0": ["run", "--sampler", "ddim", "--steps", "0"],
    "run --sampler nope": ["run", "--sampler", "nope"],
    "run --eta -1": ["run", "--sampler", "ddim", "--eta", "-1"],
    "run --config missing.yaml": ["run", "--config", "missing.yaml"],
}
STARTUP = {"--help": ["--help"], "--version": ["--version"], "list": ["list"], "run --help": ["run", "--help"],
           "help ddim": ["help", "ddim"]}


def timed(cmd: list[str], cwd: str, env: dict, timeout: float) -> tuple[float, int | None, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, None, ""
    text = (proc.stdout + proc.stderr).strip()
    return time.perf_counter() - t0, proc.returncode, text.splitlines()[-1] if text else ""


class Busy:
    """``n`` processes spinning on the CPU while the block runs; always stopped at its end."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5 if self.n else 0.0)  # let them reach the run queue
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        return False


def _summary(ts: list[float]) -> dict:
    return {"median_s": round(statistics.median(ts), 3), "min_s": round(min(ts), 3), "max_s": round(max(ts), 3),
            "runs": [round(t, 3) for t in ts]}


def phase(exe, work, env, samplers, args, busy: int) -> dict:
    """Usage errors, start-up and demos with ``busy`` spinning processes beside them."""
    out = {"usage_errors": {}, "startup": {}, "demos": {}}
    with Busy(busy):
        for name, cmd in USAGE_ERRORS.items():
            runs = [timed([*exe, *cmd], work, env, 120) for _ in range(args.repeats)]
            out["usage_errors"][name] = {**_summary([r[0] for r in runs]), "exit": sorted({r[1] for r in runs}, key=str)}
        for name, cmd in STARTUP.items():
            out["startup"][name] = _summary([timed([*exe, *cmd], work, env, 120)[0] for _ in range(args.repeats)])
        for s in samplers:
            cwd = tempfile.mkdtemp(prefix=f"demo-{s}-busy{busy}-", dir=work)
            wall, code, last = timed([*exe, "run", "--sampler", s], cwd, env, args.timeout)
            out["demos"][s] = {"wall_s": round(wall, 2), "exit": code, "last_line": last[:160]}
            shown = f"{wall:6.1f} s" if code is not None else f"> {args.timeout:.0f} s (stopped)"
            print(f"# busy {busy}: {s:<14} {shown}  exit {code}  {last[:90]}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=3, help="busy processes beside the commands in the loaded phase")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds before a demo is stopped and reported as > timeout")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each usage-error and start-up command")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every process [default: unset, "
                    "gensample's --threads auto]")
    ap.add_argument("--only", default=None, help="comma-separated samplers (default: every registered one)")
    ap.add_argument("--out", default=None, help="also write the results as JSON with provenance")
    args = ap.parse_args()
    if args.busy < 0 or args.repeats < 1:
        ap.error("--busy must be >= 0 and --repeats >= 1")

    exe = [sys.executable, "-m", "gensample"]
    work = tempfile.mkdtemp(prefix="gensample-bench-demos-")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", XDG_CACHE_HOME=os.path.join(work, "cache"))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS"):
        env.pop(var, None)
    if args.threads is not None:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    from gensample.options import manifest

    specs = manifest().samplers
    samplers = sorted(specs)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in specs]
        if unknown:
            ap.error(f"--only: unknown sampler(s) {unknown}; choose from {samplers}")
        samplers = wanted
    # fill the list cache, and the options manifest's when the shipped one is stale (a developer's tree)
    subprocess.run([*exe, "list"], cwd=work, env=env, capture_output=True)
    subprocess.run([sys.executable, "-c", "from gensample.options import manifest; manifest()"], cwd=work, env=env,
                   capture_output=True)

    idle = phase(exe, work, env, samplers, args, 0)
    loaded = phase(exe, work, env, samplers, args, args.busy)

    cores = os.cpu_count()
    print(f"machine: {platform.node()} {platform.machine()}, {cores} CPUs visible; threads: "
          f"{args.threads if args.threads is not None else 'gensample auto'}; python {platform.python_version()}\n")
    print(f"| command | idle: median (min-max) of {args.repeats} | {args.busy} busy: median (min-max) | exit |")
    print("|---|---|---|---|")
    for name in USAGE_ERRORS:
        a, b = idle["usage_errors"][name], loaded["usage_errors"][name]
        print(f"| `gensample {name}` | {a['median_s']:.2f} s ({a['min_s']:.2f}-{a['max_s']:.2f}) | "
              f"{b['median_s']:.2f} s ({b['min_s']:.2f}-{b['max_s']:.2f}) | {a['exit']} |")
    for name in STARTUP:
        a, b = idle["startup"][name], loaded["startup"][name]
        print(f"| `gensample {name}` | {a['median_s']:.2f} s ({a['min_s']:.2f}-{a['max_s']:.2f}) | "
              f"{b['median_s']:.2f} s ({b['min_s']:.2f}-{b['max_s']:.2f}) | |")
    print(f"\n| sampler | bare demo, idle | bare demo, {args.busy} busy processes | exit | output line |")
    print("|---|---|---|---|---|")
    demos = {}
    for s in samplers:
        a, b = idle["demos"][s], loaded["demos"][s]
        demos[s] = {"idle_s": a["wall_s"], "loaded_s": b["wall_s"], "exit_idle": a["exit"], "exit_loaded": b["exit"],
                    "last_line": b["last_line"] or a["last_line"]}

        def shown(d):
            return f"{d['wall_s']:.1f} s" if d["exit"] is not None else f"> {args.timeout:.0f} s (stopped)"

        print(f"| `{s}` | {shown(a)} | {shown(b)} | {a['exit']}/{b['exit']} | {demos[s]['last_line'].replace('|', '/')[:80]} |")
    slow = [s for s, d in demos.items() if d["exit_loaded"] is None or d["loaded_s"] >= 60]
    failed = [s for s, d in demos.items() if d["exit_idle"] not in (0, None) or d["exit_loaded"] not in (0, None)]
    usage_median = max(max(idle["usage_errors"][n]["median_s"], loaded["usage_errors"][n]["median_s"]) for n in USAGE_ERRORS)
    bad_exit = [n for n in USAGE_ERRORS if idle["usage_errors"][n]["exit"] != [2] or loaded["usage_errors"][n]["exit"] != [2]]
    print(f"\nslowest usage-error median: {usage_median:.2f} s (target < 1 s); usage errors not exiting 2: {bad_exit or 'none'}")
    print(f"over 60 s with {args.busy} busy processes: {slow or 'none'}; failed: {failed or 'none'}")
    if args.out:
        from _provenance import write_result

        payload = {"busy": args.busy, "threads": args.threads if args.threads is not None else "auto", "cpu_count": cores,
                   "repeats": args.repeats,
                   "usage_errors": {n: {"idle": idle["usage_errors"][n], "loaded": loaded["usage_errors"][n]} for n in USAGE_ERRORS},
                   "usage_error_median_s": usage_median,
                   "startup": {n: {"idle": idle["startup"][n], "loaded": loaded["startup"][n]} for n in STARTUP},
                   "demos": demos, "over_60s_loaded": slow, "failed": failed + [f"usage: {n}" for n in bad_exit]}
        models = sorted({specs[s].default_model for s in samplers})
        write_result(args.out, payload, models=models)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not failed and not bad_exit else 1


if __name__ == "__main__":
    sys.exit(main())
