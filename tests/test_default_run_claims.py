"""Default-run (fast) checks of central claims whose full versions are slow-only.

Time-Shift on a stock StableDiffusionPipeline (tests/sd_fixtures.py builds a tiny random one):
the slow check (tests/test_loading.py) runs one step on the SD-1.5 UNet config; here every step
of a short run is recomputed independently from what the UNet saw and what the pipeline handed
on: the model time t_s of each row is Algorithm 3's window argmin of |var(x) - (1 - alpha_bar)|
(Li et al. 2024), and the next latents are the DDIM update (Song et al. 2021, eq. 12) from the
model's eps at alpha_bar(t_s). A forward hook replaces the random UNet's output with the exact
eps of a known clean latent at the times the pipeline handed the UNet, so the latents' variance
stays near the reference and shifts land inside the window. The checks are exact (integers) or at float32 rounding, so they do
not depend on a sample size; a broken selection (matching var(x) to alpha_bar instead of
1 - alpha_bar) must fail them, and so must plain DDIM's grid-time update on the same tensors.

The other default-run versions of slow checks live next to their slow tests:
tests/test_fid_torch_fidelity.py (Inception FID vs torch-fidelity, with a broken-FID power check),
tests/test_stsl_ldm.py (latent STSL reconstruction), tests/oracles/test_posterior_oracle.py (gold
sampler on gmm-digits), tests/test_disa_quality_smoke.py (DiSA with an annealed schedule).
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sd_fixtures import tiny_sd_pipeline  # noqa: E402

from gensample.pipelines.time_shift import enable_time_shift  # noqa: E402

STEPS, WINDOW, ROWS = 6, 40, 4


def _sd_alphas_cumprod() -> torch.Tensor:
    """SD's training schedule from its definition (scaled-linear betas 0.00085..0.012, T = 1000),
    not from the scheduler object. float64."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


# Per-row variance of the clean latent the analytic eps below denoises to. The random UNet's own
# eps lets the latents' variance run far above 1 - alpha_bar (every shift would sit at the window
# edge, which a rule that always takes the edge would also pass); with x0 = X0_VAR-scaled noise the
# state's variance is about 1 - alpha_bar + alpha_bar * X0_VAR, so rows shift by different
# amounts, some strictly inside the window.
X0_VAR = (0.0, 0.01, 0.03, 0.1)
SIDE = 32  # latent side (pixels 64): 4 * 32 * 32 = 4096 entries per row, var_hat's relative sd 2 %


def _x0_target() -> torch.Tensor:
    z = torch.randn(ROWS, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z = z - z.mean(dim=(1, 2, 3), keepdim=True)
    z = z / z.std(dim=(1, 2, 3), keepdim=True)
    return z * torch.tensor(X0_VAR, dtype=torch.float64).sqrt().reshape(-1, 1, 1, 1)


def _run_and_record(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    with pytest.warns(UserWarning, match="latent pipeline"):
        enable_time_shift(pipe, window_size=WINDOW, cutoff=0)
    seen = []  # (x the UNet saw, t_s per row, eps handed back)
    ab, x0 = _sd_alphas_cumprod(), _x0_target()

    def hook(module, args, kwargs, output):
        # the UNet ran at the times the pipeline gave it; its output is replaced by the exact eps of
        # a point-mass at x0 at those times: eps = (x - sqrt(ab_s) x0) / sqrt(1 - ab_s)
        x = args[0] if args else kwargs["sample"]
        t = torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).reshape(-1).long().expand(x.shape[0])
        a = ab[t].reshape(-1, 1, 1, 1)
        eps = ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).to(x.dtype)
        seen.append((x.detach().clone(), t.clone(), eps.clone()))
        return (eps,) if isinstance(output, tuple) else type(output)(sample=eps)

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    after = []
    cb = lambda p, i, t, tensors: after.append(tensors["latents"].clone()) or {}  # noqa: E731
    # guidance_scale 1: no CFG batch, so the eps handed back is the eps the update uses
    pipe(prompt=["a cat", "a dog", "a cow", "a fox"][:ROWS], num_inference_steps=STEPS, guidance_scale=1.0,
         height=2 * SIDE, width=2 * SIDE, output_type="latent", generator=torch.Generator().manual_seed(0),
         callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])
    handle.remove()
    grid = [int(t) for t in pipe.scheduler.timesteps]
    return grid, seen, after


def _expected_shift(x: torch.Tensor, centre: int, ab: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).double()
    var = flat.var(dim=1, unbiased=True)  # (B,)
    lo, hi = max(0, centre - WINDOW // 2), min(len(ab) - 1, centre + WINDOW // 2)
    cand = torch.arange(lo, hi + 1)
    dist = (var[:, None] - (1 - ab[cand])[None, :]) ** 2
    return cand[dist.argmin(dim=1)]


def _check_time_shift(grid, seen, after):
    """Returns (number of shifted rows, max error of the update). Raises AssertionError on a
    wrong model time."""
    ab = _sd_alphas_cumprod()
    assert len(seen) == len(grid) == len(after) == STEPS
    shifted, worst = 0, 0.0
    for k, ((x, t_s, eps), x_next) in enumerate(zip(seen, after)):
        assert x.shape == (ROWS, 4, SIDE, SIDE) and t_s.numel() == ROWS
        t_expect = torch.full((ROWS,), grid[k]) if k == 0 else _expected_shift(x, grid[k], ab)
        assert torch.equal(t_s.long(), t_expect), (k, t_s.tolist(), t_expect.tolist())
        shifted += int((t_s != grid[k]).sum())
        a_s = ab[t_s.long()].reshape(-1, 1, 1, 1)
        a_n = ab[grid[k + 1]] if k + 1 < STEPS else ab[0]  # set_alpha_to_one=False: final alpha_bar = ab[0]
        x0 = (x.double() - (1 - a_s).sqrt() * eps.double()) / a_s.sqrt()
        ddim = a_n.sqrt() * x0 + (1 - a_n).sqrt() * eps.double()  # eta = 0
        worst = max(worst, ((x_next.double() - ddim).abs().max() / ddim.abs().max()).item())
    return shifted, worst


# float32 arithmetic on O(1) latents over one step: relative error of a few ulp (1.2e-7 each);
# 1e-5 leaves room for the float32 alpha_bar table and the x0 division at small alpha_bar.
UPDATE_RTOL = 1e-5


def test_time_shift_on_stable_diffusion_pipeline_follows_algorithm_3(tmp_path):
    grid, seen, after = _run_and_record(tmp_path)
    shifted, worst = _check_time_shift(grid, seen, after)
    assert shifted > 0, "the latents never left the reference variance: nothing was tested"
    inside = sum(int(((t_s != grid[k]) & ((t_s - grid[k]).abs() < WINDOW // 2)).sum())
                 for k, (_, t_s, _) in enumerate(seen) if k > 0)
    assert inside > 0, "every shift sits at a window edge: an always-the-edge rule would pass too"
    assert worst < UPDATE_RTOL, worst
    # power: plain DDIM's update at the grid time on the same tensors is far off where TS shifted
    ab = _sd_alphas_cumprod()
    off = 0.0
    for k, ((x, t_s, eps), x_next) in enumerate(zip(seen, after)):
        if not (t_s != grid[k]).any():
            continue
        a_t = ab[grid[k]]
        a_n = ab[grid[k + 1]] if k + 1 < STEPS else ab[0]
        x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
        ddim = a_n.sqrt() * x0 + (1 - a_n).sqrt() * eps.double()
        off = max(off, ((x_next.double() - ddim).abs().max() / ddim.abs().max()).item())
    assert off > 100 * UPDATE_RTOL, off


def test_time_shift_with_a_broken_reference_fails_the_check(tmp_path, monkeypatch):
    """A TS that matches var(x) to alpha_bar (the signal share) instead of 1 - alpha_bar picks
    other model times; the independent recomputation must catch it."""
    from gensample.schedulers import time_shift as ts

    monkeypatch.setattr(ts, "reference_variance", lambda ab, data_var=None: ab.double())
    grid, seen, after = _run_and_record(tmp_path)
    with pytest.raises(AssertionError):
        _check_time_shift(grid, seen, after)


# -- timing claims: the stored FKC overhead verdict follows from its own pairs ----------------
def test_noise_verdict_rule():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_fkc import noise_verdict, spread_of

    q = {"median": 1.03, "q1": 0.95, "q3": 1.10, "min": 0.9, "max": 1.2}
    assert spread_of(q, 6) == pytest.approx(0.15) and spread_of(q, 3) == pytest.approx(0.3)
    assert noise_verdict(0.03, 0.15, "x") == "within noise"  # smaller than the spread: no number
    assert noise_verdict(-0.2, 0.15, "x") == "-20.0% x"


def test_stored_fkc_overhead_verdict_follows_from_its_pairs():
    """benchmarks/results/bench_fkc_cpu.json: arms interleaved (order flips every pair), medians
    and spreads recomputed from the stored pairs, and an overhead below its spread stored as
    "within noise"."""
    import json
    import statistics
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from bench_fkc import noise_verdict, spread_of

    path = root / "benchmarks" / "results" / "bench_fkc_cpu.json"
    if not path.exists():
        pytest.skip("no stored overhead result")
    d = json.loads(path.read_text())
    pairs = d["pairs"]
    assert len(pairs) == d["repeats"] >= 4 and d["order"] == ["AB" if i % 2 == 0 else "BA" for i in range(len(pairs))]
    for key, vals in (("wall_ratio", [p["wall_ratio"] for p in pairs]),
                      ("outside_model_extra_vs_plain_step", [p["outside_model_extra_vs_plain_step"] for p in pairs])):
        q = d["summary"][key]
        assert q["median"] == pytest.approx(statistics.median(vals))
        q1, _, q3 = statistics.quantiles(sorted(vals), n=4, method="inclusive")
        assert (q["q1"], q["q3"]) == (pytest.approx(q1), pytest.approx(q3))
    for p in pairs:
        assert p["wall_ratio"] == pytest.approx(p["fkc"]["ms_per_step"] / p["plain"]["ms_per_step"])
    v, s = d["verdict"], d["summary"]
    assert v["wall_overhead"] == noise_verdict(s["wall_ratio"]["median"] - 1, spread_of(s["wall_ratio"], len(pairs)),
                                               "wall time (median of paired ratios)")
    assert v["outside_model_extra"] == noise_verdict(
        s["outside_model_extra_vs_plain_step"]["median"], spread_of(s["outside_model_extra_vs_plain_step"], len(pairs)),
        "of a plain step outside model calls (median of pairs)")
