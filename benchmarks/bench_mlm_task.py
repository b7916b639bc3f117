"""Accuracy vs NFE of the block samplers on the embedded addition model ``mdm-add``.

For every remasking strategy (fhs, low-confidence, margin, entropy, random), block length,
steps per block and confidence threshold, ``sample_blocks`` fills the answer of ``n`` problems
``"a+b="`` (the same problems for every configuration: they depend on ``--seed`` only) and we
count exact answers. Accuracy is a binomial count: each row stores ``correct``/``n``, the
standard error sqrt(p (1 - p) / n) and the 95 % Wilson interval. NFE is per sequence (calls made
while the row still had a mask in its block; ``gensample.eval.task_accuracy``). A reference row
runs the original first-hitting sampler (``sample_first_hitting``, one token per call), which must
agree with ``fhs`` at one block and one token per step within the binomial error.

    python benchmarks/bench_mlm_task.py --out benchmarks/results/mlm_task_accuracy.json
    python benchmarks/bench_mlm_task.py --smoke --model PATH --out /tmp/x.json    # seconds

Writes through ``_provenance.write_result`` (command, commit, model checksums, machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT) not in sys.path:  # run as a script from a checkout without an install
    sys.path.insert(1, str(ROOT))

from gensample.samplers.block_unmasking import CONFIDENCE_KINDS, REMASKING  # noqa: E402

OUT_FILE = "mlm_task_accuracy.json"
RESULT_FIELDS = {OUT_FILE: ["model", "task", "settings", "rows", "reference", "best_at_nfe", "table_md", "notes"]}
STRATEGIES = REMASKING  # every remasking strategy of sample_blocks


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def load_model(spec: str):
    """A zoo name (``mdm-add``) or a folder written by ``gensample.train.task_mdm``."""
    from gensample import zoo
    from gensample.zoo.task_mdm import load_task_mdm

    if Path(spec).is_dir():
        return load_task_mdm(Path(spec), name=str(spec))
    entries = zoo.discover()
    if spec not in entries:
        raise SystemExit(f"--model: {spec!r} is neither a folder nor a zoo model")
    return entries[spec].loader()


def grid(gen_length: int, strategies, temperatures, thresholds, block_lengths) -> list[dict]:
    """Every (strategy, T, block, steps) with steps = 1..block; threshold rows (confidence strategies) at one block
    of the whole answer with one step per position (the threshold alone then decides how many calls are made).
    fhs at T = 0 is left out: it chooses positions uniformly like ``random`` and takes the argmax, the same law."""
    out = []
    for temp in temperatures:
        for strat in strategies:
            if strat == "fhs" and temp == 0:
                continue
            for b in block_lengths:
                for s in range(1, b + 1):
                    out.append({"remasking": strat, "temperature": temp, "block_length": b, "steps": s, "threshold": None})
            if strat in CONFIDENCE_KINDS:
                for thr in thresholds:
                    out.append({"remasking": strat, "temperature": temp, "block_length": gen_length, "steps": gen_length,
                                "threshold": thr})
    return out


def nfe_budget(gen_length: int, block_length: int, steps: int) -> int:
    """Calls a row makes without a threshold: steps per block (fewer in a last block shorter than steps)."""
    full, rest = divmod(gen_length, block_length)
    return full * steps + (min(steps, rest) if rest else 0)


def markdown(rows: list[dict], problems: str, temperature: float) -> str:
    """Rows of one problem set and temperature, no threshold: accuracy (stderr) by strategy x (block, steps)."""
    sel = [r for r in rows if r["problems"] == problems and r["temperature"] == temperature and r["threshold"] is None]
    if not sel:
        return ""
    cols = sorted({(r["block_length"], r["steps"]) for r in sel}, key=lambda c: (-c[0], c[1]))
    head = "| strategy | " + " | ".join(f"b={b} s={s} (NFE {nfe_budget(sel[0]['gen_length'], b, s)})" for b, s in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for strat in STRATEGIES:
        cells = []
        for b, s in cols:
            r = next((r for r in sel if r["remasking"] == strat and (r["block_length"], r["steps"]) == (b, s)), None)
            cells.append("" if r is None else f"{100 * r['accuracy']:.1f} ({100 * r['stderr']:.1f})")
        if any(cells):
            lines.append(f"| {strat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mdm-add", help="zoo name or a task-model folder")
    ap.add_argument("--n", type=int, default=1000, help="problems per configuration")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--temperatures", default="1.0,0.0")
    ap.add_argument("--thresholds", default="0.9,0.7,0.5")
    ap.add_argument("--block-lengths", default=None, help="default: the answer length, 2 and 1")
    ap.add_argument("--problem-sets", default="uniform:0,carry3:3",
                    help="NAME:MIN_CARRY_CHAIN,...: uniform problems (0) and problems with a carry chain >= c")
    ap.add_argument("--smoke", action="store_true", help="tiny run: n=16, one temperature, two block lengths")
    ap.add_argument("--out", default=f"benchmarks/results/{OUT_FILE}")
    a = ap.parse_args(argv)
    import torch

    from gensample.eval.task_accuracy import measure, task_of

    torch.set_num_threads(1)
    model = load_model(a.model)
    task = task_of(model)
    G = task.answer_length
    strategies = [s for s in a.strategies.split(",") if s]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise SystemExit(f"--strategies: unknown {bad}; allowed {STRATEGIES}")
    temperatures, thresholds = _floats(a.temperatures), _floats(a.thresholds)
    blocks = _ints(a.block_lengths) if a.block_lengths else sorted({G, min(2, G), 1}, reverse=True)
    problem_sets = {}
    for item in a.problem_sets.split(","):
        name, _, chain = item.partition(":")
        problem_sets[name] = int(chain or 0)
    n = a.n
    if a.smoke:
        n, temperatures, thresholds, blocks = 16, temperatures[:1], thresholds[:1], [G, 1]
        problem_sets = {k: min(v, task.digits) for k, v in problem_sets.items()}
    rows = []
    t0 = time.perf_counter()
    for problems, chain in problem_sets.items():
        for params in grid(G, strategies, temperatures, thresholds, blocks):
            res = measure(model, params, n=n, seed=a.seed, batch_size=a.batch_size, min_carry_chain=chain)
            rows.append({"problems": problems, "min_carry_chain": chain, **params, "gen_length": G,
                         "nfe_budget": nfe_budget(G, params["block_length"], params["steps"]), **res})
            print(f"{problems} {params['remasking']:>14} T={params['temperature']} b={params['block_length']} s={params['steps']} "
              f"thr={params['threshold']}: {res['correct']}/{n} = {res['accuracy']:.3f} +- {res['stderr']:.3f}, "
                  f"NFE {res['nfe_mean']:.2f}", file=sys.stderr, flush=True)
    reference = {"sampler": "sample_first_hitting", "tokens_per_step": 1, "temperature": 1.0,
                 **measure(model, {"tokens_per_step": 1, "temperature": 1.0}, n=n, seed=a.seed,
                           batch_size=a.batch_size, sampler="fhs")}
    best = {}
    for r in rows:
        if r["threshold"] is not None:
            continue
        key = f"{r['problems']} T={r['temperature']} NFE={r['nfe_budget']}"
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = {k: r[k] for k in ("remasking", "block_length", "steps", "accuracy", "stderr", "correct", "n")}
    table = "\n\n".join(f"{p}, T = {t}\n\n" + markdown(rows, p, t) for p in problem_sets for t in temperatures)
    payload = {
        "model": a.model,
        "task": {"name": "addition", "digits": task.digits, "prompt": "a+b= (D digits each, leading zeros)",
                 "answer_length": G, "length": task.length, "problem_sets": problem_sets},
        "settings": {"n": n, "seed": a.seed, "batch_size": a.batch_size, "strategies": strategies,
                     "temperatures": temperatures, "thresholds": thresholds, "block_lengths": blocks,
                     "smoke": bool(a.smoke), "torch_threads": torch.get_num_threads(),
                     "wall_s": round(time.perf_counter() - t0, 1)},
        "rows": rows,
        "reference": reference,
        "best_at_nfe": best,
        "table_md": table,
        "notes": ("Cells: exact-match accuracy in % (binomial standard error). The same n problems for every "
                  "row (seeded), so rows are paired. nfe_budget = calls per sequence without a threshold; "
                  "nfe_mean = measured calls per sequence (lower with a threshold). Wall time is not a "
                  "benchmark here (shared machine)."),
    }
    from _provenance import write_result

    models = [a.model] if not Path(a.model).is_dir() else [str(a.model)]
    write_result(a.out, payload, models=models)
    print(table)
    return payload


if __name__ == "__main__":
    main()
