"""`gensample run --sampler stsl | dps | psld | gold`: the inverse-problem samplers' run glue.

The method (STSL, DPS, PSLD: ``InverseConfig``, the shared loop ``sample_inverse`` and the Python
entry point ``reconstruct``) lives in ``gensample.samplers.stsl``. This module turns resolved run
options into a measurement (the forward operator ``build_operator``, y from ``--measurement`` or
from a ground truth: ``--from-image`` / ``--from-digit`` / ``--from-sample``; ``measurement_for``)
and an ``InverseConfig`` (``_config_from_opts``), draws one batch, writes measurement.npy /
metrics.json / before_after.png (``write_extra``) and registers the four specs (docs/stsl.md).
``gensample.runs.smc_posterior`` reuses its measurement set-up and options.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.denoiser import Denoiser
from ..core.schedule import alphas_cumprod_from_config
from ..eval.digits_data import real_digits
from ..eval.images import make_grid, png_bytes, to_uint8, with_titles
from ..eval.restoration import psnr, ssim
from ..io import atomic_write_bytes, atomic_write_json
from ..models.posterior import GaussianMixturePosterior, PosteriorUNet
from ..samplers.baseline import make_scheduler, scheduler_loop, set_grid
from ..samplers.operators import TASKS, LinearOperator, make_operator
from ..samplers.registry import FLOW_MODEL_OPTIONS, Option, RunContext, SampleBatch, SamplerSpec, register
from ..samplers.stsl import DATA_LOSSES, INITS, STEP_RULES, TRACE_RULES, Codec, InverseConfig, reconstruct
from ..samplers.schedule_flaws import direct_loop
from .baseline import model_is_zero_snr
from .oms import OMS_START_OPTIONS, check_oms_start, oms_start
from .time_shift import TIME_SHIFT_OPTION, TS_STEP_OPTIONS, check_time_shift_flags, time_shift_step


# -- measurement set-up from run options ---------------------------------------------------------
def pixel_shape(model) -> tuple:
    return tuple(model.extras.get("pixel_shape", model.event_shape))


def build_operator(opts: dict, model) -> LinearOperator:
    task = opts.get("task") or ("inpaint-box" if len(pixel_shape(model)) == 3 else "inpaint-random")
    return make_operator(task, pixel_shape(model), seed=opts.get("task_seed") or 0, missing=opts.get("missing"),
                         box_size=opts.get("box_size"), sr_factor=opts.get("sr_factor") or 2,
                         blur_sigma=opts.get("blur_sigma"), blur_size=opts.get("blur_size"))


def _load_measurement(path: str, op: LinearOperator) -> torch.Tensor:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--measurement file not found: {path}")
    if p.suffix == ".npy":
        arr = np.load(p).astype(np.float64)
    elif p.suffix == ".png":
        img = np.asarray(Image.open(p).convert("L" if op.out_shape[0] == 1 else "RGB"), dtype=np.float64)
        arr = img / 127.5 - 1.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    else:
        raise ValueError(f"--measurement must be a .npy or .png file, got {path}")
    if arr.size != math.prod(op.out_shape):
        raise ValueError(f"--measurement {path} has shape {arr.shape}; task {op.name} expects {op.out_shape}")
    return torch.from_numpy(arr.reshape(op.out_shape))


def load_image(path: str, shape: tuple) -> torch.Tensor:
    """(1, C, H, W) float64 in [-1, 1] from an image file: converted to L (C = 1) or RGB (C = 3) and
    resized (bicubic) to H x W when its size differs (the model's pixel shape)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--from-image file not found: {path}")
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"--from-image needs an image model with 1 or 3 channels; pixel shape is {tuple(shape)}")
    try:
        img = Image.open(p).convert("L" if shape[0] == 1 else "RGB")
    except OSError as err:
        raise ValueError(f"--from-image {path}: not a readable image ({err})") from err
    if img.size != (shape[2], shape[1]):
        img = img.resize((shape[2], shape[1]), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float64) / 127.5 - 1.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


def _ground_truth(opts: dict, model, ctx: RunContext) -> torch.Tensor:
    """(1, *pixel_shape): an image file (--from-image), a held-out digit (--from-digit), or a model
    sample (--from-sample SEED)."""
    shape = pixel_shape(model)
    if opts.get("from_image"):
        return load_image(opts["from_image"], shape)
    if opts.get("from_digit") is not None or (opts.get("from_sample") is None and shape == (1, 8, 8) and "mixture" not in model.extras):
        x, _ = real_digits("test")
        idx = opts.get("from_digit") or 0
        if not 0 <= idx < len(x):
            raise ValueError(f"--from-digit must be in [0, {len(x) - 1}], got {idx}")
        return torch.from_numpy(x[idx : idx + 1]).double()
    seed = opts.get("from_sample") or 0
    gen = torch.Generator().manual_seed(int(seed))
    if "mixture" in model.extras:
        return model.extras["mixture"].sample(1, gen)
    # a DDIM(50) sample of the model (decoded for latent models)
    zero_snr = model_is_zero_snr(model)  # alpha_bar_T = 0: the stock DDIM takes the model's own v / x0 there
    sched = make_scheduler("ddim", model.scheduler_config, **({"prediction_type": model.prediction_type} if zero_snr else {}))
    set_grid(sched, 50, ctx.device, model)  # a flow model's own sigma grid (shift, mu)
    den = model.denoiser()
    x = torch.randn((1, *model.event_shape), generator=gen, device=gen.device).to(ctx.device)
    cond = model.cond_for(None, 1, ctx.device)
    sub = RunContext(sampler="from-sample", device=ctx.device)
    if zero_snr:
        x = direct_loop(sched, x, cond, {"guidance_scale": 1.0}, [gen], sub, den)
    else:
        x = scheduler_loop(den, sched, x, cond, 1.0, [gen], sub)
    return Codec(model.extras.get("vae")).decode(x).double().cpu()


_MEASUREMENTS: dict = {}


def measurement_for(opts: dict, model, ctx: RunContext):
    """(op, y (1, *out), x_true (1, *pixel) or None), cached per run configuration."""
    keys = ("model", "task", "task_seed", "missing", "box_size", "sr_factor", "blur_sigma", "blur_size",
            "measurement", "noise_std", "from_sample", "from_digit", "from_image", "height", "width")
    key = tuple(str(opts.get(k)) for k in keys)
    if key not in _MEASUREMENTS:
        op = build_operator(opts, model)
        sigma = opts.get("noise_std")
        sigma = 0.05 if sigma is None else float(sigma)
        if opts.get("measurement"):
            y, x_true = _load_measurement(opts["measurement"], op)[None], None
        else:
            x_true = _ground_truth(opts, model, ctx)
            gen = torch.Generator().manual_seed(int(opts.get("task_seed") or 0) + 7919)
            y = op.measure(x_true, sigma, [gen])
        _MEASUREMENTS.clear()
        _MEASUREMENTS[key] = (op, y.double(), x_true, sigma)
    return _MEASUREMENTS[key]


def _config_from_opts(method: str, opts: dict, model) -> InverseConfig:
    clamp = opts.get("clamp", "auto")
    clamp_x0 = (model.is_image and tuple(model.value_range) == (-1.0, 1.0)) if clamp == "auto" else clamp == "on"
    fields = {k: opts[k] for k in ("step_rule", "noise_std", "prior_var", "ddim_eta", "init", "zeta", "gamma", "omega", "inner_steps",
                                   "data_weight", "trace_rule", "trace_weight", "step_size", "probe_scale", "data_loss", "glue_weight",
                                   "reuse_eps") if opts.get(k) is not None}
    return InverseConfig(method=method, steps=opts["steps"], clamp_x0=bool(clamp_x0) and method == "dps", **fields)




def _sample_fn(method: str):
    def fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
        cfg = _config_from_opts(method, opts, model)
        op, y1, x_true, _ = measurement_for(opts, model, ctx)
        params = {k: v for k, v in cfg.__dict__.items() if k != "method"}
        sched = time_shift_step(model, opts, cfg.steps, cfg.ddim_eta, ctx.device, method) if opts.get("time_shift") else None
        oms_stats = {}

        def oms_first(sched, gens):  # One More Step start (docs/compose.md)
            x_T, _, st = oms_start(model, opts, seeds, ctx, sched, gens)
            oms_stats.update(st)
            return x_T

        start = oms_first if opts.get("oms_module") is not None else None
        x0, z0, counters = reconstruct(model, op, y1, method, seeds, ctx=ctx, scheduler=sched, start=start, latents=True,
                                       **params)
        y = y1.float().to(ctx.device).expand(len(seeds), *op.out_shape)
        stats = counters.as_stats()
        if sched is not None:
            stats["ts_window_cutoff"] = [sched.window_size_eff, sched.cutoff_eff]
        batch = _batch(x0, y, x_true, model, {**stats, **oms_stats})
        if model.is_latent:  # samples.npz keeps the latents beside the decoded pixels ("x")
            batch.extras["latents"] = z0.detach().float().cpu()
        return batch

    return fn


def _batch(x0, y, x_true, model, stats) -> SampleBatch:
    n = x0.shape[0]
    extras = {"y": y.float().cpu()}
    if x_true is not None:
        xt = x_true.float().to(x0.device).expand(n, *x_true.shape[1:])
        extras["x_true"] = xt.cpu()
        if x0.ndim == 4:
            extras["psnr"] = psnr(x0, xt).float().cpu()
            extras["ssim"] = ssim(x0, xt).float().cpu()
    return SampleBatch(x=x0.float(), extras=extras, stats=stats)


# -- gold: the exact posterior, sampled by DDPM with its analytic denoiser (docs/stsl.md) ------------
def _gold_fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    op, y1, x_true, sigma = measurement_for(opts, model, ctx)
    if sigma <= 0:
        raise ValueError("sampler 'gold' needs --noise-std > 0 (the exact posterior is degenerate at 0)")
    post = GaussianMixturePosterior(model.extras["mixture"], op.matrix(), y1.reshape(-1), sigma)
    ac = alphas_cumprod_from_config(model.scheduler_config)
    den = Denoiser(PosteriorUNet(post, ac).to(ctx.device), ac, "epsilon", plain_callable=False)
    sched = make_scheduler("ddpm", model.scheduler_config)
    sched.set_timesteps(opts["steps"], device=ctx.device)
    gens = ctx.generators(seeds)
    x = ctx.randn(gens, model.event_shape) * sched.init_noise_sigma
    x = scheduler_loop(den, sched, x, None, 1.0, gens, ctx)
    y = y1.float().to(ctx.device).expand(len(seeds), *op.out_shape)
    return _batch(x, y, x_true, model, {"nfe": den.calls, "unet_forward": den.calls})


def _validate(opts: dict, model) -> None:
    build_operator(opts, model)  # surfaces task / shape errors before sampling
    given = [f for f in ("measurement", "from_image", "from_sample", "from_digit") if opts.get(f) not in (None, "")]
    if len(given) > 1:
        names = " / ".join("--" + f.replace("_", "-") for f in given)
        raise ValueError(f"pass one of --measurement FILE, --from-image PNG, --from-sample, --from-digit; got {names}")
    if opts.get("from_image"):
        load_image(opts["from_image"], pixel_shape(model))
    if opts.get("from_digit") is not None and pixel_shape(model) != (1, 8, 8):
        raise ValueError(f"--from-digit takes the held-out 8x8 digits; model {model.name!r} has pixel shape "
                         f"{pixel_shape(model)}: use --from-sample SEED or --from-image PNG")


def _validate_composed(opts: dict, model) -> None:
    """dps / psld / stsl: the measurement, and the step rule and start they compose with."""
    _validate(opts, model)
    check_time_shift_flags(opts)
    if opts.get("oms_module") is not None:
        if opts.get("init") not in (None, "gaussian"):
            raise ValueError(f"--oms-module replaces the Gaussian z_T; it excludes --init {opts['init']} "
                             f"(stsl's default): pass --init gaussian to start from One More Step")
        check_oms_start(opts, model)


def _validate_gold(opts: dict, model) -> None:
    if "mixture" not in model.extras:
        raise ValueError(f"sampler 'gold' needs an analytic mixture model (gmm2d, gmm-digits, gmm:FILE); got {model.name!r}")
    if opts.get("noise_std") is not None and opts["noise_std"] <= 0:
        raise ValueError("sampler 'gold' needs --noise-std > 0")
    _validate(opts, model)


def write_extra(out_dir, arrays: dict, model) -> None:
    """measurement.npy; for images also before_after.png (rows: truth | measurement (A^T y) |
    reconstructions) and metrics.json (mean PSNR / SSIM against the ground truth)."""
    out_dir = Path(out_dir)
    y = arrays.get("y")
    if y is None:
        return
    buf = io.BytesIO()
    np.save(buf, y[0])
    atomic_write_bytes(out_dir / "measurement.npy", buf.getvalue())
    if "psnr" in arrays:
        atomic_write_json(out_dir / "metrics.json", {
            "psnr_mean": float(np.mean(arrays["psnr"])), "psnr_std": float(np.std(arrays["psnr"])),
            "ssim_mean": float(np.mean(arrays["ssim"])), "ssim_std": float(np.std(arrays["ssim"])),
            "n": int(len(arrays["psnr"]))})
    x = arrays["x"]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        return
    shown = [arrays["x_true"][:1]] if "x_true" in arrays else []
    if y.shape[1:] == x.shape[1:]:
        shown.append(y[:1])
    elif y.ndim == 4 and x.shape[-1] % y.shape[-1] == 0:  # super-resolution: nearest upsampling
        f = x.shape[-1] // y.shape[-1]
        shown.append(y[:1].repeat(f, -2).repeat(f, -1))
    shown.append(x[:8])
    imgs = to_uint8(np.concatenate(shown), getattr(model, "value_range", (-1.0, 1.0)))
    grid = make_grid(imgs, ncol=len(imgs), scale=max(1, 64 // imgs.shape[1]))
    has_truth = "x_true" in arrays
    titles = (["truth"] if has_truth else []) + (["y"] if len(shown) == 2 + has_truth else [])
    titles += [f"sample {i + 1}" for i in range(len(imgs) - len(titles))]
    atomic_write_bytes(out_dir / "before_after.png", png_bytes(with_titles(grid, titles)))


# -- registration ---------------------------------------------------------------------------
def _common_options(init_default: str, steps_note: str) -> tuple:
    return (
        Option("task", str, None, f"forward operator: {' | '.join(TASKS)} [default inpaint-box for images, else inpaint-random]"),
        Option("measurement", str, None, "measurement y as .npy or .png (operator output shape); else made from a ground truth"),
        Option("noise_std", float, 0.05, "measurement noise sigma_y (images in [-1, 1])", min=0.0),
        Option("from_sample", int, None, "ground truth = the model's sample with this seed (saved as x_true)", min=0),
        Option("from_digit", int, None, "ground truth = held-out test digit with this index (8x8 digit models)", min=0),
        Option("from_image", str, None, "ground truth = this image file (PNG/JPEG; resized to the model's pixel shape, "
               "the VAE's for latent models)"),
        Option("task_seed", int, 0, "seed of the operator's randomness (mask, box position, motion kernel) and of the measurement noise", min=0),
        Option("missing", float, None, "inpaint-random: fraction of missing pixels [default U(0.3, 0.7)]", min=0.0, max=0.99),
        Option("box_size", int, None, "inpaint-box: hole side [default half the image side]", min=1),
        Option("sr_factor", int, 2, "sr-bicubic / sr-avgpool: downsampling factor", min=1),
        Option("blur_sigma", float, None, "gblur: Gaussian sigma [default 3 at >=128 px, else 1]", min=1e-6),
        Option("blur_size", int, None, "gblur / mblur: kernel side (odd)", min=1),
        Option("init", INITS, init_default, "z_T: pure noise, or the forward-diffused encoded A^T y"),
        Option("ddim_eta", float, None, f"DDIM eta of the update (0 deterministic, 1 ancestral) [default 1; {steps_note}]", min=0.0),
        Option("clamp", ("auto", "on", "off"), "auto", "DPS: clamp x0_hat to [-1, 1] before A (auto: image models)"),
        Option("step_rule", STEP_RULES, "auto", "guidance scale: auto = score of N(y; A x0_hat, sigma_y^2 I + r_t^2 A A^T) "
               "(weights are multipliers of it; docs/stsl.md); paper = the papers' raw weights"),
        Option("prior_var", float, None, "auto rule: per-coordinate prior variance v in r_t^2 = v (1 - ab) / (ab v + 1 - ab) "
               "[default: estimated from the model's Tweedie covariance]", min=1e-12),
    )


# the step rule and the start an inverse sampler composes with (docs/compose.md)
_COMPOSE_OPTIONS = (TIME_SHIFT_OPTION, *TS_STEP_OPTIONS, *OMS_START_OPTIONS)

register(SamplerSpec(
    name="stsl", description="STSL second-order Tweedie posterior sampler for inverse problems (Rout et al. 2024)",
    fn=_sample_fn("stsl"), default_model="digits-ddpm", default_steps=15, validate=_validate_composed, write_extra=write_extra,
    options=_common_options("measurement", "paper rule 0") + _COMPOSE_OPTIONS + FLOW_MODEL_OPTIONS + (
        Option("inner_steps", int, 5, "K inner gradient steps per timestep", min=1),
        Option("data_weight", float, 1.0, "lambda, weight of the data term", min=0.0),
        Option("trace_rule", TRACE_RULES, "paper", "second-order term: paper = (eta / d) T_delta with a Gaussian probe "
               "(STSL Eq. 4); logdet = linearised (1/2) log det(sigma_y^2 I + A Cov A^T), probed in the range of A "
               "(docs/stsl.md, \"The trace term\")"),
        Option("trace_weight", float, None, "eta, weight of the Hutchinson trace term (0 = first order) "
               "[default: paper 0.02 on eta / d; logdet 1 = the derived scale]", min=0.0),
        Option("step_size", float, 1.0, "rho, inner gradient step (auto rule: multiplier of (1 - ab_t) / K)", min=0.0),
        Option("probe_scale", float, 1.0, "delta, finite-difference probe scale", min=1e-8),
        Option("data_loss", DATA_LOSSES, "norm", "data term ||r|| (norm) or ||r||^2 (sq, Eq. 4)"),
        Option("glue_weight", float, 0.0, "optional PSLD gluing term weight (latent)", min=0.0),
        Option("reuse_eps", bool, False, "reuse the last inner eps for the DDIM step (saves one UNet call per step)"),
    ),
    flow=True,  # at sigma = 1 (alpha_bar = 0) the inner steps are skipped and x0 comes from the velocity
))
register(SamplerSpec(
    name="dps", description="DPS diffusion posterior sampling (Chung et al. 2023), pixel or latent, baseline",
    fn=_sample_fn("dps"), default_model="digits-ddpm", default_steps=25, validate=_validate_composed, write_extra=write_extra,
    options=_common_options("gaussian", "paper rule 1") + _COMPOSE_OPTIONS + FLOW_MODEL_OPTIONS + (
        Option("zeta", float, 1.0, "DPS step weight zeta on grad ||y - A x0_hat||", min=0.0),
    ),
    flow=True,
))
register(SamplerSpec(
    name="psld", description="PSLD latent posterior sampling with the gluing term (Rout et al. 2023), baseline",
    fn=_sample_fn("psld"), default_model="digits-ldm", default_steps=100, validate=_validate_composed, write_extra=write_extra,
    options=_common_options("gaussian", "paper rule 0") + _COMPOSE_OPTIONS + FLOW_MODEL_OPTIONS + (
        Option("gamma", float, None, "PSLD gluing weight [default 0.1; auto rule: 0 on pixel models]", min=0.0),
        Option("omega", float, 1.0, "PSLD measurement weight", min=0.0),
    ),
    flow=True,
))
register(SamplerSpec(
    name="gold", description="exact posterior of a Gaussian-mixture prior (DDPM on its analytic denoiser), oracle",
    fn=_gold_fn, default_model="gmm-digits", default_steps=1000, validate=_validate_gold, write_extra=write_extra,
    options=_common_options("gaussian", "unused")[:12],
))
