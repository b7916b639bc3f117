"""`mar-digits`: a tiny MAR (transformer backbone + AdaLN-MLP diffusion head) on 8x8 sklearn digits.

Trained by `gensample train mar` (gensample/cli/cmd_mar.py); weights, the exact command and the loss
curve live in gensample/zoo/data/mar-digits/. Used by the `disa` and `mar` samplers (docs/disa.md). Also the `mar:` prefix for the
released LTH14/mar checkpoints (``load_mar_release``).
"""

from __future__ import annotations

import json
from functools import partial

from ..models.loading import LoadedModel
from ..models.mar import MAR_SCHEDULER_CONFIG, MARBackbone, MARHead, unpatchify
from . import DATA, register

MAR_DIGITS = DATA / "mar-digits"


def load_mar_folder(path, name: str) -> LoadedModel:
    """A folder with backbone/ and head/ (diffusers save_pretrained) and scheduler_config.json."""
    from pathlib import Path

    path = Path(path)
    if not (path / "backbone").is_dir() or not (path / "head").is_dir():
        raise ValueError(f"model {name!r}: no weights in {path} (expected backbone/ and head/); "
                         f"create them with `gensample train mar -o {path}`")
    backbone = MARBackbone.from_pretrained(path / "backbone").eval()
    head = MARHead.from_pretrained(path / "head").eval()
    sched_file = path / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.exists() else dict(MAR_SCHEDULER_CONFIG)
    c = backbone.config
    return LoadedModel(
        name=name,
        kind="mar",
        unet=None,
        scheduler_config=sched,
        event_shape=(1, 8, 8),
        num_classes=c.num_classes,
        null_class=c.num_classes,
        is_image=True,
        extras={
            "backbone": backbone,
            "head": head,
            "num_tokens": c.num_tokens,
            "token_dim": c.token_dim,
            "detokenize": partial(unpatchify, channels=1, size=8),
            "variance_type": "learned_range" if head.config.learn_sigma else "fixed_small",
        },
    )


@register("mar-digits", "tiny MAR on 8x8 digits: 16 2x2-patch tokens, class token, AdaLN-MLP head (disa, mar)")
def mar_digits() -> LoadedModel:
    return load_mar_folder(MAR_DIGITS, "mar-digits")


# -- released LTH14/mar checkpoints: `--model mar:PATH.pth` or `mar:DIR` (docs/disa.md) ------------
RELEASE_FILES = ("checkpoint-last.pth", "checkpoint.pth")
VAE_FILES = ("kl16.ckpt", "vae/kl16.ckpt")


def _torch_load(path):
    """torch.load with weights_only=True, allowing the argparse.Namespace the release stores as 'args'."""
    import argparse

    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (unpickling / zip errors of a wrong or foreign file)
        raise ValueError(f"--model mar:{path}: not a loadable MAR checkpoint ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from err


def _resolve_release(spec: str):
    """(checkpoint file, folder overrides dict, VAE file or None) for a `mar:` spec."""
    from pathlib import Path

    path = Path(spec).expanduser()
    overrides, vae = {}, None
    if path.is_dir():
        found = [path / f for f in RELEASE_FILES if (path / f).is_file()] or sorted(path.glob("*.pth"))
        if len(found) != 1:
            raise ValueError(f"--model mar:{spec}: expected one checkpoint in the folder ({' or '.join(RELEASE_FILES)} "
                             f"or a single *.pth), found {len(found)}")
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            overrides = json.loads(cfg_file.read_text())
        vae = next((path / f for f in VAE_FILES if (path / f).is_file()), None)
        return found[0], overrides, vae
    if not path.is_file():
        raise ValueError(f"--model mar:{spec}: no such file or folder (a released MAR checkpoint-last.pth, "
                         f"or a folder holding one)")
    return path, overrides, None


def load_mar_release(spec: str) -> LoadedModel:
    """A released MAR checkpoint (``.pth`` with ``model_ema``; ``model`` if there is no EMA) or a
    folder with one (+ optional ``config.json`` overrides such as head counts, and ``kl16.ckpt``).
    Sizes come from the tensor shapes; the state dict loads with strict=True."""
    import dataclasses

    from ..models.mar_backbone import (MAR_SIZES, MARBackboneView, MARConfig, MARModel,
                                       mar_config_from_state_dict, size_name)

    ckpt_file, overrides, vae_file = _resolve_release(spec)
    ck = _torch_load(ckpt_file)
    if isinstance(ck, dict) and ck.get("model_ema") is not None:
        state, which = ck["model_ema"], "model_ema"
    elif isinstance(ck, dict) and isinstance(ck.get("model"), dict):
        state, which = ck["model"], "model"
    elif isinstance(ck, dict) and "fake_latent" in ck:
        state, which = ck, "state_dict"
    else:
        raise ValueError(f"--model mar:{spec}: {ckpt_file.name} has neither 'model_ema' nor 'model'")
    config = mar_config_from_state_dict(state)
    args = ck.get("args") if isinstance(ck, dict) else None
    released = getattr(args, "model", None)
    if released in MAR_SIZES:  # the training command names the size; heads follow from it
        heads = MAR_SIZES[released]["heads"]
        config = dataclasses.replace(config, encoder_num_heads=heads, decoder_num_heads=heads)
    if overrides:
        unknown = sorted(set(overrides) - set(MARConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"--model mar:{spec}: config.json has unknown keys {unknown}")
        config = dataclasses.replace(config, **overrides)
    model = MARModel(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"--model mar:{spec}: {which} does not match the MAR layout inferred from its shapes: "
                         f"{str(err).splitlines()[0][:300]}") from err
    model.eval()
    grid = int(round(config.seq_len ** 0.5))
    if grid * grid != config.seq_len:
        raise ValueError(f"--model mar:{spec}: {config.seq_len} tokens is not a square grid")
    loaded = LoadedModel(
        name=f"mar:{spec}",
        kind="mar",
        unet=None,
        scheduler_config=dict(MAR_SCHEDULER_CONFIG),  # improved-DDPM cosine, T = 1000 (the release's DiffLoss)
        event_shape=(config.token_dim, grid, grid),  # latents until a VAE is attached (--vae)
        num_classes=config.class_num,
        null_class=config.class_num,  # -> fake_latent
        is_image=False,
        extras={
            "mar": model,
            "backbone": MARBackboneView(model),
            "head": model.diffloss.net,
            "num_tokens": config.seq_len,
            "token_dim": config.token_dim,
            "detokenize": partial(tokens_to_latents, grid=grid),
            "variance_type": "learned_range",  # the release's head outputs [eps, v] (2C)
            "mar_config": config.to_dict(),
            "mar_size": size_name(config) or "custom",
            "mar_weights": which,
        },
    )
    if vae_file is not None:
        attach_vae(loaded, vae_file)
    return loaded


def tokens_to_latents(tokens, grid: int):
    """(B, N, C) row-major tokens -> (B, C, h, w) latents (MAR's unpatchify with patch size 1)."""
    b, n, c = tokens.shape
    return tokens.reshape(b, grid, grid, c).permute(0, 3, 1, 2)


def attach_vae(model: LoadedModel, vae_path) -> LoadedModel:
    """Decode a released MAR's tokens with the KL-16 VAE at ``vae_path`` (``--vae``).

    The model becomes a latent model of the loader's contract: samples ``x`` stay the (C, h, w)
    latents, ``extras["vae"]`` is a diffusers AutoencoderKL with ``scaling_factor`` 0.2325, and
    ``model.decode`` gives pixels D(z / 0.2325) in [-1, 1] (MAR's evaluate), written as PNGs."""
    from ..models.kl_vae import load_ldm_vae

    if "mar" not in model.extras:
        raise ValueError(f"--vae applies to released MAR models (--model mar:...), not {model.name!r}")
    vae = load_ldm_vae(vae_path)
    c = model.extras["token_dim"]
    if vae.config.latent_channels != c:
        raise ValueError(f"--vae {vae_path}: {vae.config.latent_channels} latent channels, but the MAR tokens have {c}")
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    model.extras.update(vae=vae, vae_path=str(vae_path),
                        pixel_shape=(int(vae.config.out_channels), model.event_shape[1] * f, model.event_shape[2] * f))
    model.is_image = True
    model.value_range = (-1.0, 1.0)
    return model


def _register_prefix():
    from ..models.loading import register_prefix

    register_prefix("mar", load_mar_release,
                    "a released MAR checkpoint (LTH14/mar .pth with model_ema, or a folder with it and "
                    "kl16.ckpt); --vae kl16.ckpt decodes to images (disa, mar)")


_register_prefix()
