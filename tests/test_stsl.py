"""STSL / DPS / PSLD component properties (docs/stsl.md, "Tests") and the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gensample.models.gmm import GaussianMixture
from gensample.models.loading import gmm_model
from gensample.samplers.baseline import make_scheduler, scheduler_loop
from gensample.samplers.operators import MatrixOperator, random_inpaint
from gensample.samplers.registry import RunContext
from gensample.samplers.stsl import InverseConfig, hutchinson_trace, reconstruct, stsl_loss, Codec, Counters
from gensample.zoo.analytic import gmm2d, gmm2d_mixture

torch.set_num_threads(1)


def exact_trace_hessian(mix: GaussianMixture, x: torch.Tensor, ab: float) -> torch.Tensor:
    """Tr grad^2 log p_t for an isotropic mixture: sum_k pi_k (-D / v_k + |g_k|^2) - |g|^2."""
    mean, var = mix.noised_params(ab)  # (1, K, D), (1, K)
    diff = x[:, None, :] - mean  # (B, K, D)
    g_k = -diff / var[:, :, None]
    pi = mix.responsibilities(x, ab)
    g = (pi[:, :, None] * g_k).sum(1)
    return (pi * (-mix.dim / var + (g_k**2).sum(-1))).sum(1) - (g**2).sum(1)


@pytest.mark.parametrize("prior, delta", [("gaussian", 1.0), ("gaussian", 0.1), ("gmm", 1e-3)])
def test_hutchinson_probe_estimates_trace(prior, delta):
    """Check (a): the mean of T_delta over probes equals Tr(H) within 5 MC standard errors."""
    mix = GaussianMixture([1.0], [[0.5, -1.0]], [0.7]) if prior == "gaussian" else gmm2d_mixture()
    ab, n = 0.6, 20000
    x = torch.tensor([[0.8, 2.0]], dtype=torch.float64).expand(n, 2)
    v = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_hat = hutchinson_trace(v, mix.eps(x + delta * v, ab), mix.eps(x, ab), ab, delta)
    exact = exact_trace_hessian(mix, x[:1], ab).item()
    se = t_hat.std().item() / math.sqrt(n)
    assert abs(t_hat.mean().item() - exact) < 5 * se + 1e-9, (t_hat.mean().item(), exact, se)
    # power: the opposite sign (maximising the trace) would be far off
    assert abs(-t_hat.mean().item() - exact) > 5 * se


def test_trace_gradient_is_a_descent_direction_for_the_exact_trace():
    """The trace term's gradient (autograd through both UNet calls) lowers the exact Tr(H): the sign
    of the STSL drift (minimise +Tr H, sec. 2)."""
    model = gmm2d()
    mix = model.extras["mixture"]
    den = model.denoiser()
    ab_table = model.alphas_cumprod
    t = 400
    ab = float(ab_table[t])
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 2, generator=g) * 2
    op = MatrixOperator((2,), [[1.0, 0.0]])
    cfg = InverseConfig(data_weight=0.0, trace_weight=1.0, probe_scale=1e-2, trace_rule="paper")  # probes N(0, I) in z
    grads = torch.zeros_like(z)
    for _ in range(200):  # average the one-probe gradient
        zi = z.clone().requires_grad_(True)
        v = torch.randn(z.shape, generator=g)
        loss, _, _ = stsl_loss(zi, t, ab, v, den, None, Codec(), op, torch.zeros(64, 1), cfg, Counters())
        grads += torch.autograd.grad(loss, zi)[0] / 200
    z_new = z - 1e-3 * grads / grads.norm(dim=1, keepdim=True).clamp(min=1e-12)
    before = exact_trace_hessian(mix, z.double(), ab)
    after = exact_trace_hessian(mix, z_new.double(), ab)
    frac_down = (after < before).double().mean().item()
    assert frac_down > 0.9, frac_down


def test_gaussian_prior_trace_term_has_no_effect():
    """Check (b): linear score => grad of the trace term is 0, STSL(eta) == STSL(eta=0)."""
    model = gmm_model("gauss", GaussianMixture([1.0], [[0.5, -1.0]], [0.7]))
    op = MatrixOperator((2,), [[1.0, 0.5]])
    y = torch.tensor([[0.3]])
    kw = dict(steps=10, inner_steps=2, ddim_eta=0.0)
    a, _ = reconstruct(model, op, y, "stsl", list(range(8)), trace_weight=0.0, **kw)
    b, _ = reconstruct(model, op, y, "stsl", list(range(8)), trace_weight=5.0, **kw)
    # float32 UNet-batch rounding only (the linear score makes the trace term constant in z)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    # power: on a mixture (non-linear score) the same trace weight changes the samples
    c, _ = reconstruct(gmm2d(), op, y, "stsl", list(range(8)), trace_weight=0.0, **kw)
    d, _ = reconstruct(gmm2d(), op, y, "stsl", list(range(8)), trace_weight=5.0, **kw)
    assert (c - d).abs().max() > 1e-2


@pytest.mark.parametrize("rule", ["logdet", "paper"])
def test_sampler_probes_lie_in_the_range_of_a(rule):
    """The loop draws the trace probe per sample and inner step: with the "logdet" rule on a mask
    v = A^T u, u = +-1 (Rademacher), so z + delta v differs from z only on observed pixels, by exactly
    +-delta (docs/stsl.md, "The trace term"); the paper rule's v ~ N(0, I) moves every pixel."""
    from gensample.zoo.analytic import gmm_digits

    model = gmm_digits()
    op = random_inpaint((1, 8, 8), 0.5, seed=2)
    y = op.measure(model.extras["mixture"].sample(1, torch.Generator().manual_seed(0)), 0.05, [torch.Generator().manual_seed(1)])
    calls = []
    base = model.denoiser()

    class Recording:
        def __call__(self, z, t, cond=None):
            calls.append(z.detach().clone())
            return base(z, t, cond)

        def __getattr__(self, name):
            return getattr(base, name)

    model_den = model.denoiser
    model.denoiser = lambda: Recording()
    try:
        reconstruct(model, op, y, "stsl", [0, 1], steps=2, inner_steps=2, prior_var=1.0, probe_scale=0.5, trace_rule=rule)
    finally:
        model.denoiser = model_den
    pairs = [c for c in calls if c.shape[0] == 4]  # the batched [z, z + delta v] calls
    assert len(pairs) == 4
    observed = op.mask.bool().expand(1, 8, 8)
    for c in pairs:
        dv = (c[2:] - c[:2]).double()  # (2, 1, 8, 8) = delta v
        if rule == "logdet":
            assert dv[:, ~observed].abs().max() == 0
            torch.testing.assert_close(dv[:, observed].abs(), torch.full_like(dv[:, observed], 0.5), atol=1e-6, rtol=0)
        else:
            assert dv[:, ~observed].abs().min() > 0


def _ddim_baseline(model, seeds, steps, eta):
    ctx = RunContext(sampler="ddim")
    gens = ctx.generators(seeds)
    sched = make_scheduler("ddim", model.scheduler_config)
    sched.set_timesteps(steps)
    x = ctx.randn(gens, model.event_shape)
    return scheduler_loop(model.denoiser(), sched, x, None, 1.0, gens, ctx, eta=eta)


@pytest.mark.parametrize("method, params, eta", [
    ("stsl", dict(data_weight=0.0, trace_weight=0.0, inner_steps=2, init="gaussian", ddim_eta=0.0), 0.0),
    ("stsl", dict(data_weight=0.0, trace_weight=0.0, inner_steps=2, init="gaussian", reuse_eps=True, ddim_eta=0.0), 0.0),
    ("stsl", dict(data_weight=0.0, trace_weight=0.0, inner_steps=1, init="gaussian"), 1.0),
    ("dps", dict(zeta=0.0, ddim_eta=1.0), 1.0),
    ("psld", dict(gamma=0.0, omega=0.0, ddim_eta=0.0), 0.0),
    ("psld", dict(gamma=0.0, omega=0.0, step_rule="paper"), 0.0),
])
def test_zero_data_weight_is_unconditional_ddim(method, params, eta):
    """Check (c): with zero guidance weights the loop reproduces the stock DDIM trajectory."""
    model = gmm2d()
    seeds = list(range(10, 22))
    op = random_inpaint((2,), 0.5, seed=0)
    x, _ = reconstruct(model, op, torch.tensor([[1.0, 0.0]]), method, seeds, steps=25, **params)
    ref = _ddim_baseline(model, seeds, 25, eta)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    # power: a non-zero weight moves the samples
    strong = {"stsl": {"data_weight": 1.0}, "dps": {"zeta": 1.0}, "psld": {"omega": 1.0}}[method]
    x2, _ = reconstruct(model, op, torch.tensor([[1.0, 0.0]]), method, seeds, steps=25, **{**params, **strong})
    assert (x2 - ref).abs().max() > 0.1


def test_pixel_psld_equals_dps_on_ddim_for_inpainting():
    """Check (d): identity codec + mask => gluing residual == measurement residual, so PSLD(gamma, omega)
    == DPS on DDIM with zeta = gamma + omega."""
    from gensample.zoo.analytic import gmm_digits

    model = gmm_digits()
    op = random_inpaint((1, 8, 8), 0.5, seed=2)
    x_true = model.extras["mixture"].sample(1, torch.Generator().manual_seed(0))
    y = op.measure(x_true, 0.05, [torch.Generator().manual_seed(1)])
    seeds = [3, 4, 5]
    a, _ = reconstruct(model, op, y, "psld", seeds, steps=15, gamma=0.3, omega=0.7, ddim_eta=0.0)
    b, _ = reconstruct(model, op, y, "dps", seeds, steps=15, zeta=1.0, ddim_eta=0.0)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    c, _ = reconstruct(model, op, y, "dps", seeds, steps=15, zeta=0.3, ddim_eta=0.0)
    assert (a - c).abs().max() > 1e-2


def test_identity_operator_noiseless_recovers_y():
    """Check (e): A = I, sigma -> 0, strong data weight: the output approaches y."""
    op = MatrixOperator((2,), np.eye(2))
    y = torch.tensor([[1.0, 2.0]])
    x, _ = reconstruct(gmm2d(), op, y, "stsl", list(range(16)), steps=50, inner_steps=5, data_weight=0.4, data_loss="sq",
                       step_rule="paper")
    assert (x - y).abs().max() < 0.15
    x0, _ = reconstruct(gmm2d(), op, y, "stsl", list(range(16)), steps=50, inner_steps=1, data_weight=0.0, trace_weight=0.0)
    assert (x0 - y).abs().max() > 1.0  # power: no data term, no recovery


@pytest.mark.parametrize("reuse, forward", [(False, 550), (True, 500)])
def test_nfe_counters(reuse, forward):
    """Check (f): N = 50, K = 5 -> 250 paper NFE; UNet evaluations counted honestly."""
    op = MatrixOperator((2,), [[1.0, 0.0]])
    _, c = reconstruct(gmm2d(), op, torch.tensor([[1.0]]), "stsl", [0], steps=50, inner_steps=5, reuse_eps=reuse, prior_var=1.0)
    assert c.nfe_paper == 250
    assert c.unet_forward == forward and c.unet_backward == 500
    # the auto rule's one-off prior-variance estimate (8 points, one forward + one backward each) is counted
    _, c = reconstruct(gmm2d(), op, torch.tensor([[1.0]]), "stsl", [0], steps=50, inner_steps=5, reuse_eps=reuse)
    assert (c.unet_forward, c.unet_backward) == (forward + 8, 508) and c.prior_var > 0
    _, c = reconstruct(gmm2d(), op, torch.tensor([[1.0]]), "psld", [0], steps=40)
    assert (c.nfe_paper, c.unet_forward, c.unet_backward, c.vae_decode) == (40, 48, 48, 0)


def test_config_user_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        InverseConfig(method="p2l")
    with pytest.raises(ValueError, match="--data-loss must be one of"):
        InverseConfig(data_loss="l1")
    with pytest.raises(ValueError, match="--probe-scale"):
        InverseConfig(probe_scale=0.0)
    with pytest.raises(ValueError, match="y must have shape"):
        reconstruct(gmm2d(), MatrixOperator((2,), [[1.0, 0.0]]), torch.zeros(1, 2), "stsl", [0], steps=2)


# -- CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli():
    from gensample.cli import main

    return lambda *args: CliRunner().invoke(main, list(args))


def test_cli_stsl_on_gmm_digits_writes_before_after(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("run", "--sampler", "stsl", "--model", "gmm-digits", "-n", "3", "--steps", "4", "--inner-steps", "2",
            "--from-sample", "5", "--device", "cpu", "-o", str(out))
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "run.json").read_text())
    assert rec["stats"]["nfe_paper"] == 8 and rec["stats"]["unet_forward"] == 4 * (2 * 2 + 1) + 8
    for f in ("before_after.png", "metrics.json", "measurement.npy", "grid.png"):
        assert (out / f).exists(), f
    z = np.load(out / "samples.npz")
    assert z["x"].shape == (3, 1, 8, 8) and z["x_true"].shape == (3, 1, 8, 8) and z["psnr"].shape == (3,)
    # the measurement round-trips through --measurement FILE
    out2 = tmp_path / "run2"
    r = cli("run", "--sampler", "dps", "--model", "gmm-digits", "-n", "2", "--steps", "3", "--measurement",
            str(out / "measurement.npy"), "--device", "cpu", "-o", str(out2))
    assert r.exit_code == 0, r.output
    # ... and as a PNG (uint8 in [0, 255] -> [-1, 1]); --from-digit takes a held-out digit as truth
    from PIL import Image

    y = np.load(out / "measurement.npy")[0]
    Image.fromarray(np.clip(np.rint((y + 1) * 127.5), 0, 255).astype(np.uint8), mode="L").save(tmp_path / "y.png")
    r = cli("run", "--sampler", "psld", "--model", "gmm-digits", "-n", "1", "--steps", "2", "--measurement",
            str(tmp_path / "y.png"), "--device", "cpu", "-o", str(tmp_path / "run3"))
    assert r.exit_code == 0, r.output
    r = cli("run", "--sampler", "psld", "--model", "gmm-digits", "-n", "1", "--steps", "2", "--from-digit", "7",
            "--device", "cpu", "-o", str(tmp_path / "run4"))
    assert r.exit_code == 0, r.output
    from gensample.eval.digits_data import real_digits

    np.testing.assert_allclose(np.load(tmp_path / "run4" / "samples.npz")["x_true"][0], real_digits("test")[0][7], atol=1e-6)


def test_cli_trace_rule_flag(cli, tmp_path):
    """--trace-rule reaches the sampler (same seeds, different samples); the default is the paper's
    term under both step rules (docs/stsl.md, "The trace term"); a bad value exits 2 naming the flag."""
    from gensample.runs.stsl import _config_from_opts

    def run(out, *extra):
        r = cli("run", "--sampler", "stsl", "--model", "gmm2d", "--task", "inpaint-random", "-n", "4", "--steps", "3",
                "--inner-steps", "2", "--prior-var", "1", "--device", "cpu", "-o", str(tmp_path / out), *extra)
        assert r.exit_code == 0, r.output
        return np.load(tmp_path / out / "samples.npz")["x"]

    a, c = run("a"), run("c", "--trace-rule", "logdet")
    assert np.abs(a - c).max() > 1e-4
    model = gmm2d()
    for rule in ("auto", "paper"):
        cfg = _config_from_opts("stsl", {"steps": 2, "step_rule": rule, "trace_rule": "paper"}, model)
        assert (cfg.trace_rule, cfg.trace_weight) == ("paper", 0.02)
    assert _config_from_opts("stsl", {"steps": 2, "trace_rule": "logdet"}, model).trace_weight == 1.0
    r = cli("run", "--sampler", "stsl", "--model", "gmm2d", "--trace-rule", "jensen", "-n", "1", "--steps", "2",
            "--device", "cpu", "-o", str(tmp_path / "e"))
    assert r.exit_code == 2 and "trace-rule" in r.output and "Traceback" not in r.output, r.output


def test_cli_matrix_task_on_gmm2d(cli, tmp_path):
    np.save(tmp_path / "A.npy", np.array([[0.6, 0.8]]))
    r = cli("run", "--sampler", "psld", "--model", "gmm2d", "--task", f"matrix:{tmp_path / 'A.npy'}", "-n", "4",
            "--steps", "5", "--device", "cpu", "-o", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "o" / "samples.npz")["y"].shape == (4, 1)


@pytest.mark.parametrize("args, match", [
    (["--sampler", "stsl", "--model", "gmm2d", "--task", "inpaint-box"], "needs image inputs"),
    (["--sampler", "stsl", "--model", "gmm2d", "--task", "deblur"], "--task must be one of"),
    (["--sampler", "stsl", "--model", "gmm2d", "--inner-steps", "0"], "--inner-steps must be >= 1"),
    (["--sampler", "dps", "--model", "gmm2d", "--inner-steps", "2"], "does not apply to sampler"),
    (["--sampler", "gold", "--model", "gmm2d", "--noise-std", "0"], "--noise-std > 0"),
    (["--sampler", "stsl", "--model", "gmm2d", "--measurement", "nope.npy"], "not found"),
    (["--sampler", "dps", "--model", "gmm-digits", "--measurement", "y.npy", "--from-digit", "1"], "pass one of"),
])
def test_cli_user_errors_exit_2(cli, tmp_path, args, match):
    r = cli("run", *args, "-n", "2", "--steps", "2", "--device", "cpu", "-o", str(tmp_path / "e"))
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output
