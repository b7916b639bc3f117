"""Resolve a model spec (zoo name, ``prefix:FILE``, diffusers folder or hub id) to a LoadedModel.

Extension points (so each method adds models without editing this file):
- zoo entries: ``gensample.zoo.register(name, description)`` on a loader function;
- prefixes: ``register_prefix("markov", loader)`` makes ``--model markov:FILE.json`` work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.denoiser import Denoiser
from ..core.schedule import alphas_cumprod_from_config

# Training schedule used by every analytic model: DDPM linear betas (Ho et al. 2020, sec. 4).
DEFAULT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "timestep_spacing": "leading",
    "steps_offset": 0,
}


@dataclass
class LoadedModel:
    """Everything a sampler needs about a model.

    kind: "diffusion" (eps/x0/v model on a VP schedule), or a method-specific kind
        ("mar", "masked_lm", ...) for non-diffusion models.
    unet: module with the diffusers UNet call signature (diffusion kinds).
    scheduler_config: the training schedule (a diffusers scheduler config dict).
    event_shape: shape of one sample, e.g. (2,) or (1, 8, 8).
    num_classes: 0 if unconditional; else class labels are 0..num_classes-1 and
        ``null_class`` (usually num_classes) is the unconditional label for CFG.
    extras: method-specific parts (the exact mixture as "mixture", a VAE, a text encoder ...).
    """

    name: str
    kind: str = "diffusion"
    unet: Any = None
    scheduler_config: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULER_CONFIG))
    event_shape: tuple = ()
    num_classes: int = 0
    null_class: int | None = None
    prediction_type: str = "epsilon"
    is_image: bool = False
    value_range: tuple = (-1.0, 1.0)
    extras: dict = field(default_factory=dict)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return alphas_cumprod_from_config(self.scheduler_config)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def denoiser(self) -> Denoiser:
        if self.unet is None:
            raise ValueError(f"model {self.name!r} ({self.kind}) has no diffusion network")
        null = None
        if self.num_classes and self.null_class is not None:
            null = {"class_labels": torch.tensor([self.null_class])}
        return Denoiser(self.unet, self.alphas_cumprod, self.prediction_type, plain_callable=False, null_cond=null)

    def cond_for(self, class_label: int | None, n: int, device) -> dict | None:
        """Conditioning dict for n samples of one class (None: unconditional)."""
        if class_label is None:
            if self.num_classes and self.null_class is not None:
                return {"class_labels": torch.full((n,), self.null_class, dtype=torch.long, device=device)}
            return None
        if not self.num_classes:
            raise ValueError(f"model {self.name!r} is unconditional; --class-label is not allowed")
        if not 0 <= class_label < self.num_classes:
            raise ValueError(f"class label must be in [0, {self.num_classes - 1}] for model {self.name!r}, got {class_label}")
        return {"class_labels": torch.full((n,), int(class_label), dtype=torch.long, device=device)}

    def to(self, device=None, dtype=None) -> "LoadedModel":
        for part in [self.unet, *self.extras.values()]:
            if isinstance(part, torch.nn.Module):
                part.to(device=device) if dtype is None else part.to(device=device, dtype=dtype)
        return self


PrefixLoader = Callable[[str], LoadedModel]
_PREFIXES: dict[str, tuple[PrefixLoader, str]] = {}


def register_prefix(prefix: str, loader: PrefixLoader, description: str = "") -> None:
    _PREFIXES[prefix] = (loader, description)


def prefixes() -> dict[str, str]:
    _ensure_registered()
    return {k: v[1] for k, v in _PREFIXES.items()}


def gmm_model(name: str, mixture, scheduler_config: dict | None = None) -> LoadedModel:
    from .gmm import GMMUNet

    cfg = dict(DEFAULT_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
    unet = GMMUNet(mixture, alphas_cumprod_from_config(cfg))
    return LoadedModel(
        name=name,
        kind="diffusion",
        unet=unet,
        scheduler_config=cfg,
        event_shape=mixture.event_shape,
        num_classes=mixture.num_classes,
        null_class=mixture.num_classes if mixture.num_classes else None,
        is_image=len(mixture.event_shape) == 3,
        extras={"mixture": mixture},
    )


def _load_gmm_file(path: str) -> LoadedModel:
    from .gmm import GaussianMixture

    return gmm_model(f"gmm:{path}", GaussianMixture.from_json(path))


def _ensure_registered() -> None:
    if "gmm" not in _PREFIXES:
        register_prefix("gmm", _load_gmm_file, "a Gaussian mixture from a JSON file (weights, means, stds, labels?)")
    from .. import zoo  # noqa: F401  (zoo modules register prefixes and names on import)

    zoo.discover()


def load_diffusers(spec: str, name: str | None = None) -> LoadedModel:
    """A diffusers UNet2DModel / pipeline folder or hub id (hub ids need network access)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    path = Path(spec)
    try:
        if path.is_dir() and (path / "model_index.json").exists():
            index = json.loads((path / "model_index.json").read_text())
            unet_cls = UNet2DConditionModel if "text_encoder" in index else UNet2DModel
            unet = unet_cls.from_pretrained(path, subfolder="unet")
            sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        elif path.is_dir() and (path / "config.json").exists():
            cfg = json.loads((path / "config.json").read_text())
            unet_cls = UNet2DConditionModel if cfg.get("_class_name") == "UNet2DConditionModel" else UNet2DModel
            unet = unet_cls.from_pretrained(path)
            sched_file = path / "scheduler_config.json"
            sched = json.loads(sched_file.read_text()) if sched_file.exists() else dict(DEFAULT_SCHEDULER_CONFIG)
        elif path.exists():
            raise ValueError(f"--model {spec}: a model folder needs model_index.json or config.json")
        else:
            unet = UNet2DModel.from_pretrained(spec, subfolder="unet")
            sched = dict(DDPMScheduler.load_config(spec, subfolder="scheduler"))
    except (OSError, EnvironmentError) as err:
        raise ValueError(f"could not load model {spec!r}: not a zoo name, prefix or loadable diffusers model ({err.__class__.__name__})") from err
    unet.eval()
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    c = unet.config
    num_classes = int(c.get("num_class_embeds") or 0) if hasattr(c, "get") else 0
    null = None
    if num_classes:
        null = num_classes - 1  # our convention: the last embedding is the null class
        num_classes -= 1
    size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)[0]
    return LoadedModel(
        name=name or spec,
        kind="diffusion",
        unet=unet,
        scheduler_config=sched,
        event_shape=(c.in_channels, size, size),
        num_classes=num_classes,
        null_class=null,
        prediction_type=sched.get("prediction_type", "epsilon"),
        is_image=True,
    )


def load_model(spec: str) -> LoadedModel:
    """Resolve ``spec``: zoo name | ``prefix:FILE`` | diffusers folder | hub id."""
    from .. import zoo

    _ensure_registered()
    if not isinstance(spec, str) or not spec:
        raise ValueError("model must be a non-empty string")
    if spec in zoo.ZOO:
        return zoo.ZOO[spec].loader()
    if ":" in spec and not Path(spec).exists():
        prefix, rest = spec.split(":", 1)
        if prefix in _PREFIXES:
            return _PREFIXES[prefix][0](rest)
        if len(prefix) > 1:  # not a Windows drive letter
            raise ValueError(f"unknown model prefix {prefix!r}; known: {sorted(_PREFIXES)}")
    path = Path(spec)
    if path.exists() or "/" in spec:
        return load_diffusers(spec)
    raise ValueError(
        f"unknown model {spec!r}; choose a zoo model ({', '.join(sorted(zoo.ZOO))}), "
        f"a prefix spec ({', '.join(p + ':FILE' for p in sorted(_PREFIXES))}), a diffusers folder or a hub id"
    )
