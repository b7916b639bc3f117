"""FHS vs the cached ancestral sampler on a long exact Markov-chain language (docs/first_hitting.md).

Zheng et al. 2024 (arXiv 2409.02908) claim ~20x for FHS over MDLM's ``ddpm_cache`` in the
categorical-heavy regime (N >= 10 L grid steps, |V| = 50k). That regime exists only for MDLM's
one-stage draw (K'+1 uniforms per masked position per step); our float64 ancestral step draws a
V-row only where a token is revealed, so its categorical time no longer grows like N L K'. Here: a banded random chain with
V = 1000 tokens, L = 256 (``models.markov.banded_chain``), whose exact denoiser (forward-backward)
stands in for the network, so the output law is known:

- gen-PPL = exp(-log p(x) / L) under the true chain (exact, no judge model), with the exact
  reference exp(H(X) / L); entropy = mean over samples of the entropy (nats) of the sample's token
  histogram (the paper's metric), reported next to every perplexity;
- wall time split into model time (forward-backward) and categorical-sampling time, and NFE.

Run:  python benchmarks/bench_fhs.py [--vocab 1000 --length 256 --batch 8 --mults 1,4 --float32 --json out.json]
      python benchmarks/bench_fhs.py --toy-table   # docs/first_hitting.md table: entropy vs N with 8-bit uniforms
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

RESULT_FIELDS = {"bench_fhs.json": ["args", "exact_nll_per_token", "rows"]}

from gensample.models.markov import MarkovDenoiser, banded_chain
from gensample.samplers.first_hitting import (
    MaskedDiffusionConfig,
    initial_tokens,
    sample_ancestral,
    sample_first_hitting,
)


def histogram_entropy(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) entropy in nats of each row's token histogram."""
    out = []
    for row in tokens:
        c = torch.bincount(row).double()
        q = c[c > 0] / c.sum()
        out.append(-(q * q.log()).sum())
    return torch.stack(out)


def exact_nll_per_token(chain) -> float:
    """H(X_1..X_L) / L in nats for the chain (initial entropy + sum of conditional entropies)."""
    pi, P = chain.initial, chain.transition
    plogp = torch.where(P > 0, P * P.log(), torch.zeros_like(P)).sum(1)  # (V,) -H(next | v)
    h = -(pi * torch.where(pi > 0, pi.log(), torch.zeros_like(pi))).sum()
    marg = pi.clone()
    for _ in range(chain.length - 1):
        h = h - (marg * plogp).sum()
        marg = marg @ P
    return float(h) / chain.length


def run_one(name, fn, net, chain, cfg, batch, seed):
    x = initial_tokens(batch, chain.length, chain.mask_token_id)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    t0 = time.perf_counter()
    out, st = fn(net, x, cfg, gens)
    wall = time.perf_counter() - t0
    assert (out != chain.mask_token_id).all()
    nll = -chain.log_prob(out) / chain.length  # (B,) nats/token
    ent = histogram_entropy(out)
    return {"sampler": name, "wall_s": wall, "nfe": st["model_rows"] / batch, "calls": st["nfe"], "model_time_s": st["model_time_s"],
            "categorical_time_s": st["categorical_time_s"], "gen_ppl": math.exp(float(nll.mean())),
            "nll_per_token": float(nll.mean()), "nll_se": float(nll.std(unbiased=True) / math.sqrt(len(nll))) if len(nll) > 1 else float("nan"),
            "entropy": float(ent.mean()), "entropy_se": float(ent.std(unbiased=True) / math.sqrt(len(ent))) if len(ent) > 1 else float("nan")}


def toy_table(n: int = 20_000, seed: int = 8) -> None:
    """docs/first_hitting.md on the K=3, L=4 toy chain: ancestral sampler with b-bit uniforms, entropy of the
    empirical law over the 81 sequences and P(all four equal); FHS at b=8 for comparison."""
    from gensample.models.markov import toy_chain

    chain = toy_chain()
    net = MarkovDenoiser(chain)

    def stats_of(tokens):
        c = torch.bincount(chain.index_of(tokens), minlength=81).double()
        q = c[c > 0] / c.sum()
        return float(-(q * q.log()).sum()), float((tokens == tokens[:, :1]).all(1).double().mean())

    print(f"toy chain, n={n}: exact entropy 2.7632, P(all equal) .512")
    print(f"{'sampler':<14}{'N':>6}{'b=8 H':>9}{'b=8 eq':>9}{'b=24 H':>9}{'b=24 eq':>9}{'b=53 H':>9}{'b=53 eq':>9}")
    for N in (16, 128, 1024):
        cells = []
        for bits in (8, 24, None):
            cfg = MaskedDiffusionConfig(mask_token_id=3, num_inference_steps=N, uniform_bits=bits)
            out, _ = sample_ancestral(net, initial_tokens(n, 4, 3), cfg, torch.Generator().manual_seed(seed))
            cells += list(stats_of(out))
        print(f"{'ancestral':<14}{N:6d}" + "".join(f"{v:9.3f}" for v in cells))
    out, _ = sample_first_hitting(net, initial_tokens(n, 4, 3), MaskedDiffusionConfig(mask_token_id=3, uniform_bits=8),
                                  torch.Generator().manual_seed(seed))
    h, eq = stats_of(out)
    print(f"{'fhs':<14}{'-':>6}{h:9.3f}{eq:9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--mults", default="1,4", help="ancestral grid sizes N as multiples of L")
    ap.add_argument("--float32", action="store_true", help="also run the largest-N ancestral sampler with MDLM float32 Gumbel noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--toy-table", action="store_true", help="print the docs/first_hitting.md entropy table and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.toy_table:
        toy_table()
        return
    chain = banded_chain(args.vocab, args.length, seed=args.seed)
    net = MarkovDenoiser(chain)
    mask = chain.mask_token_id
    rows = [run_one("fhs", sample_first_hitting, net, chain, MaskedDiffusionConfig(mask_token_id=mask), args.batch, args.seed)]
    mults = [int(v) for v in args.mults.split(",") if v]
    for m in mults:
        N = m * args.length
        cfg = MaskedDiffusionConfig(mask_token_id=mask, num_inference_steps=N)
        rows.append(run_one(f"ancestral N={N}", sample_ancestral, net, chain, cfg, args.batch, args.seed))
        if args.float32 and m == max(mults):
            cfg32 = MaskedDiffusionConfig(mask_token_id=mask, num_inference_steps=N, precision="float32")
            rows.append(run_one(f"ancestral N={N} fp32", sample_ancestral, net, chain, cfg32, args.batch, args.seed))
    ref = exact_nll_per_token(chain)
    fhs = rows[0]
    print(f"chain V={args.vocab} L={args.length}, batch {args.batch}; exact gen-PPL {math.exp(ref):.3f} "
          f"(NLL {ref:.4f} nats/token)")
    print(f"{'sampler':<22}{'wall s':>9}{'x FHS':>8}{'NFE':>7}{'x FHS':>8}{'model s':>9}{'categ. s':>10}"
          f"{'cat x FHS':>10}{'gen-PPL':>9}{'NLL +- se':>18}{'entropy +- se':>18}")
    for r in rows:
        print(f"{r['sampler']:<22}{r['wall_s']:9.2f}{r['wall_s'] / fhs['wall_s']:8.2f}{r['nfe']:7.1f}"
              f"{r['nfe'] / fhs['nfe']:8.2f}{r['model_time_s']:9.2f}{r['categorical_time_s']:10.2f}"
              f"{r['categorical_time_s'] / fhs['categorical_time_s']:10.1f}{r['gen_ppl']:9.3f}"
              f"{r['nll_per_token']:10.4f} +- {r['nll_se']:.4f}{r['entropy']:10.3f} +- {r['entropy_se']:.3f}")
    if args.json:
        from _provenance import write_result

        write_result(args.json, {"args": vars(args), "exact_nll_per_token": ref, "rows": rows}, models=[])


if __name__ == "__main__":
    main()
