"""Speed of masked-diffusion LM sampling at LLaDA-8B / Dream-7B layer shapes (docs/masked_lms.md, "Speed").

A 7-8B model does not fit this benchmark's CPU budget, and its speed does not depend on the weights, so the
network cost is measured on ONE random-weight transformer layer of the release's shapes (our own
``LLaDALlamaBlock`` / ``DreamLayer``) and on a slice of the output head, then scaled: a forward costs
``n_layers x t_layer + t_head``. Measured separately, with a zero-cost stand-in network:

- the sampler's own overhead per step (its draws, the float64 rows it upcasts, the commit rule) for each
  remasking strategy of ``gensample.samplers.block_unmasking`` and for diffusers' stock
  ``BlockRefinementScheduler`` loop (the LLaDA2 / DiffusionGemma pipelines' scheduler) at equal steps;
- the number of network calls (NFE) of each strategy on a synthetic confidence profile (each position's top
  token has probability drawn uniformly from [0.3, 0.999]: only the threshold strategy's NFE depends on it).

Shapes (the released config.json files):
    LLaDA-8B   d 4096, 32 heads (32 kv), SwiGLU MLP 12288, 32 layers, vocab 126,464 (untied head)
    Dream-7B   d 3584, 28 heads (4 kv, grouped), SwiGLU MLP 18944, 28 layers, vocab 152,064 (untied head)

Estimated time of one sample = NFE x t_forward + steps x overhead; with the Fast-dLLM prefix cache
(``gensample.models.llada.PrefixCachedNetwork``) each block costs one full refresh and (calls - 1) cached
calls that run only the rows from the block on, against the kept keys/values (timed at the mean query
length over blocks), with the head on the block's rows only. tokens/s = gen_length x batch / that time.

Arms are interleaved (network timings and sampler loops alternate in each repeat, order reversed every
other repeat); every timing is a median over ``--repeats`` with its (max - min) / median spread, and the
1-minute load average is recorded. One thread by default (``--threads``); on the CPU the seconds are the
process's CPU time (the work itself; wall time on a shared machine also counts waiting for a core, and is
recorded beside the layer timings), on a GPU wall time after a synchronise.

    python benchmarks/bench_mlm_speed.py                     # full shapes, ~5-10 min on one CPU thread
    python benchmarks/bench_mlm_speed.py --tiny --out /tmp/mlm_speed.json   # seconds: checks the script

On a GPU (bfloat16) the network is orders of magnitude faster and the sampler overhead's share grows:
``--device cuda --dtype bfloat16`` times the network pieces there; the sampler loops always run on the CPU
(their tensors are CPU tensors), so a GPU sampler timing still needs its own arm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from gensample.samplers.block_unmasking import REMASKING  # noqa: E402

OUT_FILE = "mlm_speed.json"
RESULT_FIELDS = {OUT_FILE: ["settings", "shapes", "network", "sampler", "estimates", "load_average", "notes"]}

SHAPES = {
    "llada-8b": {"family": "llada", "d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "mlp": 12288, "n_layers": 32,
                 "vocab": 126464, "rope_theta": 500000.0},
    "dream-7b": {"family": "dream", "d_model": 3584, "n_heads": 28, "n_kv_heads": 4, "mlp": 18944, "n_layers": 28,
                 "vocab": 152064, "rope_theta": 1000000.0},
}
TINY_SHAPES = {
    "llada-8b": {**SHAPES["llada-8b"], "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "mlp": 96, "n_layers": 2,
                 "vocab": 500},
    "dream-7b": {**SHAPES["dream-7b"], "d_model": 56, "n_heads": 4, "n_kv_heads": 2, "mlp": 96, "n_layers": 2,
                 "vocab": 600},
}
STRATEGIES = (*REMASKING, "threshold")  # "threshold": low-confidence with Fast-dLLM parallel commits
STOCK = ("stock-greedy", "stock-multinomial")  # diffusers' BlockRefinementScheduler at temperature 0 / 1


# -- network pieces ------------------------------------------------------------------------------------------------
def make_layer(shape: dict, dtype, device):
    """One random-weight layer of the family's architecture (our implementations of the released blocks)."""
    import torch

    torch.manual_seed(0)
    if shape["family"] == "llada":
        from gensample.models.llada import LLaDALlamaBlock, llada_config

        cfg = llada_config({"d_model": shape["d_model"], "n_heads": shape["n_heads"], "n_kv_heads": shape["n_kv_heads"],
                            "mlp_hidden_size": shape["mlp"], "n_layers": 1, "block_type": "llama", "rope": True,
                            "layer_norm_type": "rms", "activation_type": "silu", "rope_theta": shape["rope_theta"],
                            "vocab_size": shape["vocab"], "embedding_size": shape["vocab"], "weight_tying": False})
        layer = LLaDALlamaBlock(cfg)
    else:
        from gensample.models.dream import DreamLayer, dream_config

        cfg = dream_config({"hidden_size": shape["d_model"], "num_attention_heads": shape["n_heads"],
                            "num_key_value_heads": shape["n_kv_heads"], "intermediate_size": shape["mlp"],
                            "num_hidden_layers": 1, "vocab_size": shape["vocab"], "rope_theta": shape["rope_theta"]})
        layer = DreamLayer(cfg)
    return layer.to(device=device, dtype=dtype).eval()


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Seconds of a section: process CPU time on the CPU (one thread: what the work itself consumed, far less
    sensitive to other jobs on a shared machine than wall time), wall time on a GPU. ``wall`` is kept too."""

    def __init__(self, device="cpu"):
        self.device = device
        self.cpu = str(device).startswith("cpu")

    def __enter__(self):
        _sync(self.device)
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall = time.perf_counter() - self.w0
        self.seconds = (time.process_time() - self.c0) if self.cpu else self.wall


def time_network(shape: dict, s: dict, dtype, device) -> dict:
    """Seconds of one layer on the full sequence, one layer on the cached rows (mean query length over blocks,
    against the kept keys/values of the rest), and the head on T rows / on a block's rows (timed on a
    ``head_fraction`` slice of the vocabulary and scaled by vocab / slice: the head is one matmul, linear in V)."""
    import torch
    import torch.nn.functional as F

    from gensample.models.llada import rope_tables

    B, T, d = s["batch"], s["prompt_length"] + s["gen_length"], shape["d_model"]
    hd = d // shape["n_heads"]
    n_blocks = -(-s["gen_length"] // s["block_length"])
    rows_cached = T - round(s["prompt_length"] + (n_blocks - 1) / 2 * s["block_length"])  # mean rows >= p
    past_len = T - rows_cached
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d, generator=g).to(device=device, dtype=dtype)
    sin, cos = rope_tables(T, hd, shape["rope_theta"], device)
    layer = make_layer(shape, dtype, device)
    out = {}
    with torch.inference_mode():
        _, (k, v) = layer(x, sin, cos)  # the kept keys/values of a refresh
        past = (k[:, :, :past_len].contiguous(), v[:, :, :past_len].contiguous())
        xq = x[:, past_len:].contiguous()
        layer(x, sin, cos)  # warm-up
        with Clock(device) as c:
            layer(x, sin, cos)
        out["layer_full_s"], out["layer_full_wall_s"] = c.seconds, c.wall
        with Clock(device) as c:
            layer(xq, sin, cos, past)
        out["layer_cached_s"], out["layer_cached_wall_s"] = c.seconds, c.wall
        del layer, past, k, v
        v_slice = max(1, int(shape["vocab"] * s["head_fraction"]))
        w = torch.randn(v_slice, d, generator=g).to(device=device, dtype=dtype)
        F.linear(x[:, : s["block_length"]], w)  # warm-up
        for key, rows in (("head_full_s", x), ("head_block_s", x[:, : s["block_length"]])):
            with Clock(device) as c:
                F.linear(rows, w)
            out[key] = c.seconds * shape["vocab"] / v_slice
    out["rows_cached"], out["past_cached"] = rows_cached, past_len
    return out


# -- sampler loops with a stand-in network -------------------------------------------------------------------------
def confidence_logits(B: int, W: int, V: int, seed: int):
    """(B, W, V) float32 stand-in logits: zeros except one random token per position with logit
    log(p (V - 1) / (1 - p)), so that its probability is exactly p, p ~ U[0.3, 0.999] per position."""
    import torch

    g = torch.Generator().manual_seed(seed)
    p = 0.3 + 0.699 * torch.rand(B, W, generator=g, dtype=torch.float64)
    top = torch.randint(0, V - 1, (B, W), generator=g)
    logits = torch.zeros(B, W, V)
    logits.scatter_(-1, top.unsqueeze(-1), torch.log(p * (V - 1) / (1 - p)).float().unsqueeze(-1))
    return logits


class StandIn:
    """A zero-cost network with the block interface: returns precomputed (B, block, V) logits for the block asked."""

    def __init__(self, B: int, T: int, V: int, seed: int = 0, block_length: int = 32):
        self.table = confidence_logits(B, block_length, V, seed)  # the same profile in every block
        self.calls = 0

    def __call__(self, x, block=None):
        self.calls += 1
        return self.table[:, : block[1] - block[0]]


def run_ours(strategy: str, s: dict, V: int, gen_length: int):
    """Our block sampler on the stand-in: (CPU seconds, nfe)."""
    import torch

    from gensample.samplers.block_unmasking import BlockConfig, sample_blocks

    B, T = s["batch"], s["prompt_length"] + gen_length
    mask = V - 1
    x = torch.full((B, T), mask, dtype=torch.long)
    x[:, : s["prompt_length"]] = 0
    remasking = "low-confidence" if strategy == "threshold" else strategy
    cfg = BlockConfig(gen_length=gen_length, block_length=s["block_length"], steps=s["steps"], remasking=remasking,
                      temperature=s["temperature"], threshold=s["threshold"] if strategy == "threshold" else None,
                      mask_token_id=mask)
    net = StandIn(B, T, V, block_length=s["block_length"])
    gens = [torch.Generator().manual_seed(b) for b in range(B)]
    with Clock() as c:
        out, st = sample_blocks(net, x, cfg, gens)
    assert not (out == mask).any()
    return c.seconds, st["nfe"]


def run_stock(strategy: str, s: dict, V: int, gen_length: int):
    """diffusers' BlockRefinementScheduler loop (mask mode) on the stand-in, ``s["steps"]`` per block, its threshold
    set above 1 so that it commits by confidence only (LLaDA's low-confidence rule); a block ends when it has no mask.
    Returns (CPU seconds, nfe)."""
    import torch
    from diffusers import BlockRefinementScheduler

    B, T, bl = s["batch"], s["prompt_length"] + gen_length, s["block_length"]
    mask = V - 1
    x = torch.full((B, T), mask, dtype=torch.long)
    x[:, : s["prompt_length"]] = 0
    net = StandIn(B, T, V, block_length=bl)
    sched = BlockRefinementScheduler(block_length=bl, num_inference_steps=s["steps"], threshold=2.0)
    g = torch.Generator().manual_seed(0)
    temperature = 0.0 if strategy == "stock-greedy" else float(s["temperature"])
    nfe = 0
    clock = Clock().__enter__()
    for start in range(s["prompt_length"], T, bl):
        end = min(start + bl, T)
        sched.set_timesteps(s["steps"], block_length=end - start)
        for i in range(s["steps"]):
            if not (x[:, start:end] == mask).any():
                break
            logits = net(x, block=(start, end))
            nfe += 1
            res = sched.step(logits, i, x[:, start:end], mask_token_id=mask, temperature=temperature, threshold=2.0,
                             generator=g)
            x[:, start:end] = res.prev_sample
    clock.__exit__()
    assert not (x == mask).any()
    return clock.seconds, nfe


# -- driver --------------------------------------------------------------------------------------------------------
def _spread(vals) -> float:
    m = statistics.median(vals)
    return (max(vals) - min(vals)) / m if m > 0 else 0.0


def _summ(vals) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "spread": _spread(vals),
            "n": len(vals)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32, help="network calls per block (LLaDA's 'steps' / blocks)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threshold", type=float, default=0.9,
                    help="Fast-dLLM parallel-commit threshold of the 'threshold' arm")
    ap.add_argument("--head-fraction", type=float, default=0.125, help="vocabulary slice the head is timed on")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and lengths: checks the script in seconds")
    ap.add_argument("--out", default=f"benchmarks/results/{OUT_FILE}")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    shapes = TINY_SHAPES if a.tiny else SHAPES
    if a.tiny:
        a.prompt_length, a.gen_length, a.block_length, a.steps, a.repeats = 8, 16, 8, 4, min(a.repeats, 2)
    s = {"batch": a.batch, "prompt_length": a.prompt_length, "gen_length": a.gen_length, "block_length": a.block_length,
         "steps": a.steps, "temperature": a.temperature, "threshold": a.threshold, "head_fraction": a.head_fraction}
    dtype = getattr(torch, a.dtype)
    n_blocks = -(-a.gen_length // a.block_length)
    # NFE does not depend on V under the stand-in's profile (each position's top probability is set exactly):
    # counted once per strategy at a small vocabulary, then the overhead is timed at the full vocabulary on ONE block
    nfe = {}
    for strategy in STRATEGIES:
        nfe[strategy] = run_ours(strategy, s, 512, a.gen_length)[1]
    for strategy in STOCK:
        nfe[strategy] = run_stock(strategy, s, 512, a.gen_length)[1]
    net_runs = {m: [] for m in a.models}
    samp_runs = {m: {k: [] for k in (*STRATEGIES, *STOCK)} for m in a.models}
    loads = []
    for r in range(a.repeats):
        models = a.models if r % 2 == 0 else a.models[::-1]
        for m in models:
            loads.append(os.getloadavg()[0])
            net_runs[m].append(time_network(shapes[m], s, dtype, a.device))
            arms = [*STRATEGIES, *STOCK]
            for k in (arms if r % 2 == 0 else arms[::-1]):
                fn = run_stock if k in STOCK else run_ours
                wall, calls = fn(k, s, shapes[m]["vocab"], a.block_length)  # one block, the full vocabulary
                samp_runs[m][k].append({"wall_s": wall, "nfe": calls})
            last = net_runs[m][-1]
            print(f"  repeat {r} {m}: layer {last['layer_full_s']:.3f} s, head {last['head_full_s']:.3f} s", flush=True)
    loads.append(os.getloadavg()[0])
    network, sampler, estimates = {}, {}, {}
    for m in a.models:
        sh = shapes[m]
        keys = ("layer_full_s", "layer_cached_s", "head_full_s", "head_block_s")
        net = {k: _summ([run[k] for run in net_runs[m]]) for k in keys}
        net["rows_cached"], net["past_cached"] = net_runs[m][0]["rows_cached"], net_runs[m][0]["past_cached"]
        full = sh["n_layers"] * net["layer_full_s"]["median"] + net["head_full_s"]["median"]
        refresh = sh["n_layers"] * net["layer_full_s"]["median"] + net["head_block_s"]["median"]
        cached = sh["n_layers"] * net["layer_cached_s"]["median"] + net["head_block_s"]["median"]
        net["forward_full_s"], net["forward_refresh_s"], net["forward_cached_s"] = full, refresh, cached
        network[m] = net
        sampler[m], estimates[m] = {}, {}
        for k, runs in samp_runs[m].items():
            per_step = [run["wall_s"] / max(run["nfe"], 1) for run in runs]
            block_nfe = runs[0]["nfe"]
            sampler[m][k] = {"overhead_per_step_s": _summ(per_step), "nfe_one_block": block_nfe}
            ovh = statistics.median(per_step) * nfe[k]
            t_plain = nfe[k] * full + ovh
            t_cache = n_blocks * refresh + max(nfe[k] - n_blocks, 0) * cached + ovh
            gen_tokens = a.gen_length * a.batch
            estimates[m][k] = {"nfe": nfe[k], "tokens_per_call": gen_tokens / a.batch / nfe[k],
                               "sampler_overhead_s": ovh, "overhead_share": ovh / t_plain,
                               "seconds": t_plain, "tokens_per_s": gen_tokens / t_plain,
                               "seconds_prefix_cache": t_cache, "tokens_per_s_prefix_cache": gen_tokens / t_cache}
    notes = (f"Per-layer timings on {a.device} ({a.dtype}, {a.threads} thread(s)) scaled to the full depth; NFE "
             "from the block sampler on a stand-in network whose top-token probability is uniform on [0.3, 0.999] "
             "per position (only 'threshold' depends on it: a real model's confidence sets its NFE); sampler "
             f"overhead per step timed on one block at the full vocabulary, B = {a.batch}. Seconds are process CPU "
             "time on the CPU (wall on a GPU). The stock loop is diffusers' BlockRefinementScheduler with threshold "
             "2 (pure confidence top-k, LLaDA's low-confidence rule) at the same steps per block.")
    payload = {"settings": {**s, "tiny": a.tiny, "n_blocks": n_blocks, "repeats": a.repeats, "threads": a.threads,
                            "device": a.device, "dtype": a.dtype},
               "shapes": {m: shapes[m] for m in a.models}, "network": network, "sampler": sampler,
               "estimates": estimates, "load_average": {"per_arm": loads, "median": statistics.median(loads)},
               "notes": notes}
    for m in a.models:
        net = network[m]
        print(f"\n{m}: forward {net['forward_full_s']:.2f} s (prefix-cache call {net['forward_cached_s']:.2f} s)")
        print(f"  {'strategy':18s} {'NFE':>5s} {'tok/call':>8s} {'ovh/step ms':>11s} {'spread':>6s} {'tok/s':>8s} "
              f"{'tok/s cache':>11s}")
        for k, e in estimates[m].items():
            o = sampler[m][k]["overhead_per_step_s"]
            print(f"  {k:18s} {e['nfe']:5d} {e['tokens_per_call']:8.2f} {o['median'] * 1e3:11.2f} {o['spread']:6.0%} "
                  f"{e['tokens_per_s']:8.3f} {e['tokens_per_s_prefix_cache']:11.3f}")
    print(f"load average (1 min) median {payload['load_average']['median']:.2f}")
    if not a.no_save:
        from _provenance import write_result

        write_result(a.out, payload, models=[])
        print(f"wrote {a.out}")
    return payload


if __name__ == "__main__":
    main()
