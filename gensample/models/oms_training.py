"""Training for the OMS demo models (docs/oms.md "Shipped models"): the schedule-flawed base, its
schedule-fix baselines, and the OMS module itself.

Data ("brightness digits", 16x16x1 in [-1, 1]): sklearn's bundled 8x8 digits, bilinearly
upsampled to 16x16, zero-mean pattern of amplitude 0.5 on a per-image brightness level
level_k in {-0.6, 0, +0.6}, k uniform (the class label):
    x0 = clamp(level_k + 0.5 (d - mean(d)), -1, 1),   d in [0, 1] the digit image.
So the per-image mean is level_k (up to the clamp): a wide spread of brightness, on digit strokes.

Schedules (all T = 1000, scaled_linear from beta_start = 0.00085):
- ``flawed``   beta_end = 0.006 -> alpha_bar_T = 0.0477, eps-prediction;
- ``zero-snr`` the same betas rescaled to alpha_bar_T = 0 (Lin et al. 2023, Alg. 1), v-prediction,
  sampled with trailing spacing (Lin et al. 2023, sec. 3.3);
- ``offset-noise`` the flawed schedule with eps <- eps + delta n, n ~ N(0, 1) of shape (B, C, 1, 1)
  (crosslabs offset noise; diffusers' --noise_offset), eps-prediction of that noise.

The OMS objective (Hu et al. 2024: v-prediction at zero SNR, where v = -x0; docs/oms.md "Training"):
L = E ||psi(x_T', c) + x0||^2, x_T' ~ N(0, I) drawn independently of x0; the base model and its
schedule play no part.

Every training run is single-threaded-friendly, checkpoints every ``ckpt_every`` steps into
``<out>/checkpoint.pt`` (model, optimiser, LR schedule, data generator, loss log) and resumes from it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core.schedule import alphas_cumprod_from_config

LEVELS = (-0.6, 0.0, 0.6)
PATTERN_AMPLITUDE = 0.5
IMAGE_SIZE = 16
VARIANTS = ("flawed", "zero-snr", "offset-noise")

FLAWED_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.006,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

BASE_UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 16, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "num_class_embeds": len(LEVELS) + 1,  # last = null class (class dropout)
}


def scheduler_config_for(variant: str) -> dict:
    """The training schedule of a variant (diffusers DDIMScheduler config)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cfg = dict(FLAWED_SCHEDULER_CONFIG)
    if variant == "zero-snr":
        cfg.update(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)
    return cfg


@lru_cache(maxsize=1)
def _digit_patterns() -> torch.Tensor:
    """(1797, 1, 16, 16) float32 zero-mean digit patterns d - mean(d), d in [0, 1]."""
    from sklearn.datasets import load_digits

    d = torch.as_tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    d = torch.nn.functional.interpolate(d, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return d - d.mean(dim=(1, 2, 3), keepdim=True)


def brightness_digits(n: int, generator: torch.Generator, labels: torch.Tensor | None = None):
    """n draws of the brightness-digits data: (x0 (n, 1, 16, 16) float32, labels (n,) int64)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pats = _digit_patterns()
    if labels is None:
        labels = torch.randint(len(LEVELS), (n,), generator=generator)
    idx = torch.randint(pats.shape[0], (n,), generator=generator)
    level = torch.tensor(LEVELS, dtype=torch.float32)[labels].reshape(n, 1, 1, 1)
    x0 = (level + PATTERN_AMPLITUDE * pats[idx]).clamp(-1, 1)
    return x0, labels.long()


@dataclass
class TrainConfig:
    steps: int = 2500
    batch_size: int = 64
    lr: float = 2e-3  # OneCycle peak
    seed: int = 0
    cond_dropout: float = 0.2  # probability of the null class
    offset_noise: float = 0.1  # delta, offset-noise variant only
    ckpt_every: int = 250
    threads: int = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "ckpt_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.offset_noise < 0:
            raise ValueError(f"offset_noise must be >= 0, got {self.offset_noise}")


def _drop_labels(labels: torch.Tensor, null: int, p: float, gen: torch.Generator) -> torch.Tensor:
    drop = torch.rand(labels.shape, generator=gen) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def base_loss_fn(variant: str, cfg: TrainConfig, sched_cfg: dict) -> Callable:
    """Per-batch loss of the base UNet for a variant (DDPM eq. 14; v-loss, Salimans & Ho sec. 4)."""
    ab_table = alphas_cumprod_from_config(sched_cfg).float()  # (T,)
    T = ab_table.numel()
    null = len(LEVELS)

    def loss(unet, gen):
        x0, labels = brightness_digits(cfg.batch_size, gen)
        labels = _drop_labels(labels, null, cfg.cond_dropout, gen)
        t = torch.randint(T, (cfg.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        if variant == "offset-noise":
            eps = eps + cfg.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
        ab = ab_table[t].reshape(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        target = eps if sched_cfg["prediction_type"] == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        out = unet(x_t, t, class_labels=labels).sample
        return (out - target).pow(2).mean()

    return loss


def oms_loss_fn(dataset: Callable, null: int, cfg: TrainConfig) -> Callable:
    """L = ||psi(x_T', c) + x0||^2 with x_T' ~ N(0, I) independent of x0 (docs/oms.md "Training")."""

    def loss(module, gen):
        x0, labels = dataset(cfg.batch_size, gen)
        labels = _drop_labels(labels, null, cfg.cond_dropout, gen)
        x_Tp = torch.randn(x0.shape, generator=gen)
        v_hat = module(x_Tp, class_labels=labels).sample
        return (v_hat + x0).pow(2).mean()

    return loss


def fit(model: torch.nn.Module, loss: Callable, cfg: TrainConfig, out_dir: Path, resume: bool = True,
        desc: str = "train", log: Callable[[str], None] | None = None) -> list[dict]:
    """AdamW + OneCycle loop with checkpoint/resume; returns the loss log [{step, loss, time_s}].

    One data generator seeded with cfg.seed drives every draw, and its state is checkpointed,
    so a resumed run continues the same stream.
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    ckpt = out_dir / "checkpoint.pt"
    history: list[dict] = []
    start, elapsed = 0, 0.0
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["train_config"] != asdict(cfg):
            raise ValueError(f"{ckpt} was written with different settings; pass --no-resume or another --output")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        gen.set_state(state["generator"])
        start, history, elapsed = state["step"], state["history"], state["time_s"]
        if log:
            log(f"resuming from step {start}")
    model.train()
    t0 = time.perf_counter()
    window: list[float] = []
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", leave=False)
    for step in range(start + 1, cfg.steps + 1):
        value = loss(model, gen)
        if not torch.isfinite(value):
            raise FloatingPointError(f"{desc}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(value.item())
        bar.update(1)
        if step % 50 == 0 or step == cfg.steps:
            history.append({"step": step, "loss": float(np.mean(window)), "time_s": elapsed + time.perf_counter() - t0})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            window = []
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_schedule": sched.state_dict(),
                        "generator": gen.get_state(), "step": step, "history": history,
                        "time_s": elapsed + time.perf_counter() - t0, "train_config": asdict(cfg)}, ckpt)
    bar.close()
    model.eval()
    return history


def write_record(out_dir: Path, command: str, cfg: TrainConfig, history: list[dict], extra: dict) -> None:
    """train.json (exact command, settings, final loss) and loss.csv beside the weights."""
    rec = {"command": command, "train_config": asdict(cfg), "final_loss": history[-1]["loss"] if history else None,
           "train_time_s": history[-1]["time_s"] if history else None, "torch": torch.__version__, **extra}
    (out_dir / "train.json").write_text(json.dumps(rec, indent=2) + "\n")
    lines = ["step,loss,time_s"] + [f"{h['step']},{h['loss']:.6f},{h['time_s']:.1f}" for h in history]
    (out_dir / "loss.csv").write_text("\n".join(lines) + "\n")


def train_base(out_dir: str | Path, variant: str = "flawed", cfg: TrainConfig | None = None, resume: bool = True,
               command: str = "", log=None):
    """Train the brightness-digits UNet2DModel for a variant; save a diffusers folder
    (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json, train.json, loss.csv)."""
    from diffusers import UNet2DModel

    cfg = cfg or TrainConfig()
    sched_cfg = scheduler_config_for(variant)
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    unet = UNet2DModel(**BASE_UNET_CONFIG)
    history = fit(unet, base_loss_fn(variant, cfg, sched_cfg), cfg, out_dir, resume=resume, desc=f"train {variant}", log=log)
    unet.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2) + "\n")
    extra = {"variant": variant, "scheduler_config": sched_cfg, "data": "brightness_digits",
             "levels": list(LEVELS), "params": sum(p.numel() for p in unet.parameters())}
    if variant == "offset-noise":
        extra["offset_noise"] = cfg.offset_noise
    write_record(out_dir, command, cfg, history, extra)
    return unet, history


def train_oms(base, out_dir: str | Path, cfg: TrainConfig | None = None, resume: bool = True, command: str = "",
              log=None, **module_overrides):
    """Train a small class-conditional OMSModule on the data of a LoadedModel ``base``
    (``base.extras["dataset"]``: (n, generator) -> (x0, labels), or an exact ``mixture``)."""
    from .oms import small_oms_module

    cfg = cfg or TrainConfig(steps=1500, cond_dropout=0.1)
    dataset = training_data(base)
    if not base.num_classes:
        raise ValueError(f"--base {base.name!r} is unconditional; the small OMS module is class-conditional")
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    module = small_oms_module(in_channels=base.event_shape[0], num_classes=base.num_classes, **module_overrides)
    history = fit(module, oms_loss_fn(dataset, module.null_class, cfg), cfg, out_dir, resume=resume, desc="train oms", log=log)
    module.save_pretrained(out_dir, safe_serialization=True)
    write_record(out_dir, command, cfg, history, {"base": base.name, "objective": "||psi(x_T', c) + x0||^2",
                                                   "params": sum(p.numel() for p in module.parameters())})
    return module, history


def training_data(base) -> Callable:
    """(n, generator) -> (x0, labels) for a LoadedModel: its dataset, or draws from its exact mixture."""
    if callable(base.extras.get("dataset")):
        return base.extras["dataset"]
    mixture = base.extras.get("mixture")
    if mixture is not None and getattr(mixture, "num_classes", 0):
        labels_k = torch.as_tensor(mixture.labels).long()  # (K,) component -> class
        class_w = torch.zeros(mixture.num_classes, dtype=torch.float64).index_add_(0, labels_k, mixture.weights.double())

        def draw(n, gen):
            labels = torch.multinomial(class_w, n, replacement=True, generator=gen)
            x0 = torch.empty((n, *mixture.event_shape))
            for c in labels.unique().tolist():
                sel = labels == c
                x0[sel] = mixture.sample(int(sel.sum()), generator=gen, label=c).float()
            return x0, labels

        return draw
    raise ValueError(f"--base {base.name!r} ships no training data (extras['dataset']) or class-labelled mixture, "
                     f"so `gensample train oms` cannot train for it (it trains on the zoo models' own data, e.g. "
                     f"--base digits-flawed); for your own model use a released One More Step module with "
                     f"`gensample run --oms-module` (docs/oms.md)")


def oms_dc_gap(module, num_classes: int, n: int = 64, seed: int = 0) -> dict:
    """Diagnostics of a trained module: per-class mean of -psi's spatial mean, and its spread
    across x_T' (the MSE optimum psi* = -E[x0|c] does not depend on x_T'; docs/oms.md "Training")."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, module.config.in_channels, IMAGE_SIZE, IMAGE_SIZE)
    res = {}
    with torch.no_grad():
        for c in range(num_classes):
            v = module(torch.randn(shape, generator=gen), class_labels=torch.full((n,), c)).sample
            dc = (-v).mean(dim=(1, 2, 3))
            res[c] = {"mean": dc.mean().item(), "std_over_noise": dc.std().item()}
    return res
