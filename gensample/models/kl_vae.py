"""LDM-layout KL autoencoders (MAR's KL-16, ``kl16.ckpt``) converted to diffusers ``AutoencoderKL``.

The KL-16 VAE used by MAR (Li et al. 2024, sec. 5.1; the latent-diffusion KL-VAE design of Rombach
et al. 2022, sec. 3) has ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks per level, z 16, attention
at 16x16 resolution in the encoder's last level and in both mid blocks, none in the decoder's up
levels. Every piece has a diffusers counterpart with the same math, so the conversion is exact:

- encoder level i -> ``DownEncoderBlock2D``, or ``AttnDownEncoderBlock2D`` where the LDM level has
  attention; decoder level i -> ``up_blocks[L-1-i]`` (diffusers orders them coarse to fine),
  ``UpDecoderBlock2D`` or ``AttnUpDecoderBlock2D``;
- ResnetBlock ``norm1/conv1/norm2/conv2/nin_shortcut`` -> ``norm1/conv1/norm2/conv2/conv_shortcut``;
- AttnBlock ``norm, q, k, v, proj_out`` (1x1 convolutions, one head) -> Attention ``group_norm,
  to_q, to_k, to_v, to_out.0`` (linear layers: the 1x1 kernels reshaped);
- ``down.i.downsample.conv`` -> ``downsamplers.0.conv`` (both pad (0, 1, 0, 1) then stride 2),
  ``up.i.upsample.conv`` -> ``upsamplers.0.conv``; ``norm_out`` -> ``conv_norm_out``.

The configuration is read off the checkpoint (channels, levels, res blocks, z, attention levels),
so tiny test VAEs in the same layout convert too. Keys of the training loss (``loss.*``, the
discriminator and LPIPS) are ignored; any other key left over is an error (the conversion is
strict both ways). Decoding MAR tokens: ``decode(latents / 0.2325)`` (MAR's latent scale).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

IGNORED_PREFIXES = ("loss.",)


def _levels(state: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in state for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    if not idx:
        raise ValueError(f"not an LDM KL autoencoder: no {prefix}.N.* keys")
    return max(idx) + 1


def ldm_vae_config(state: dict) -> dict:
    """diffusers AutoencoderKL config from an LDM-layout state dict's shapes."""
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight"):
        if key not in state:
            raise ValueError(f"not an LDM KL autoencoder state dict: missing {key!r}")
    n_down, n_up = _levels(state, "encoder.down"), _levels(state, "decoder.up")
    if n_down != n_up:
        raise ValueError(f"encoder has {n_down} levels but decoder {n_up}")
    chans = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n_down)]
    res_blocks = len({int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")})
    dec_blocks = len({int(k.split(".")[4]) for k in state if k.startswith("decoder.up.0.block.")})
    if dec_blocks != res_blocks + 1:
        raise ValueError(f"decoder levels have {dec_blocks} res blocks; diffusers needs encoder's {res_blocks} + 1")
    down = ["AttnDownEncoderBlock2D" if f"encoder.down.{i}.attn.0.q.weight" in state else "DownEncoderBlock2D"
            for i in range(n_down)]
    up = ["AttnUpDecoderBlock2D" if f"decoder.up.{n_up - 1 - j}.attn.0.q.weight" in state else "UpDecoderBlock2D"
          for j in range(n_up)]
    z = int(state["post_quant_conv.weight"].shape[0])
    return {
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": chans,
        "layers_per_block": res_blocks,
        "latent_channels": z,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 0.2325,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state,
    }


def _resnet(src: str, dst: str) -> list[tuple[str, str]]:
    pairs = [(f"{src}.{a}", f"{dst}.{a}") for a in ("norm1", "conv1", "norm2", "conv2")]
    return pairs + [(f"{src}.nin_shortcut", f"{dst}.conv_shortcut")]


def _attn(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}.norm", f"{dst}.group_norm"), (f"{src}.q", f"{dst}.to_q"), (f"{src}.k", f"{dst}.to_k"),
            (f"{src}.v", f"{dst}.to_v"), (f"{src}.proj_out", f"{dst}.to_out.0")]


def _key_pairs(config: dict) -> list[tuple[str, str]]:
    """(LDM module name, diffusers module name) for every module of the layout in ``config``."""
    n = len(config["block_out_channels"])
    per = config["layers_per_block"]
    pairs: list[tuple[str, str]] = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.norm_out", f"{part}.conv_norm_out"),
                  (f"{part}.conv_out", f"{part}.conv_out")]
        pairs += _resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        pairs += _resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        pairs += _attn(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
    for i in range(n):
        for b in range(per):
            pairs += _resnet(f"encoder.down.{i}.block.{b}", f"encoder.down_blocks.{i}.resnets.{b}")
            pairs += _attn(f"encoder.down.{i}.attn.{b}", f"encoder.down_blocks.{i}.attentions.{b}")
        pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        j = n - 1 - i
        for b in range(per + 1):
            pairs += _resnet(f"decoder.up.{i}.block.{b}", f"decoder.up_blocks.{j}.resnets.{b}")
            pairs += _attn(f"decoder.up.{i}.attn.{b}", f"decoder.up_blocks.{j}.attentions.{b}")
        pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{j}.upsamplers.0.conv"))
    return pairs


def _is_attn_linear(dst: str) -> bool:
    return ".attentions." in dst and dst.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")


def convert_ldm_vae_state_dict(state: dict, config: dict) -> dict:
    """LDM KL-VAE state dict -> diffusers AutoencoderKL state dict (module prefixes renamed;
    attention 1x1 conv kernels (C, C, 1, 1) -> linear (C, C)). Raises on any unmapped key."""
    out, used = {}, set()
    for src, dst in _key_pairs(config):
        for suffix in ("weight", "bias"):
            key = f"{src}.{suffix}"
            if key in state:
                value = state[key]
                if _is_attn_linear(dst) and suffix == "weight" and value.ndim == 4:
                    value = value[:, :, 0, 0]
                out[f"{dst}.{suffix}"] = value
                used.add(key)
    left = sorted(k for k in state if k not in used and not k.startswith(IGNORED_PREFIXES))
    if left:
        raise ValueError(f"LDM VAE keys with no diffusers counterpart: {left[:8]}{' ...' if len(left) > 8 else ''}")
    return out


def export_ldm_state_dict(vae) -> dict:
    """The inverse: a diffusers AutoencoderKL -> an LDM-layout state dict (as in ``kl16.ckpt``'s
    ``model``). Used to write random-weight checkpoints in the release's format for tests."""
    diff = vae.state_dict()
    out = {}
    for src, dst in _key_pairs(dict(vae.config)):
        for suffix in ("weight", "bias"):
            key = f"{dst}.{suffix}"
            if key in diff:
                value = diff[key]
                if _is_attn_linear(dst) and suffix == "weight" and value.ndim == 2:
                    value = value[:, :, None, None]
                out[f"{src}.{suffix}"] = value.clone()
    if len(out) != len(diff):
        raise ValueError("this AutoencoderKL has modules with no LDM counterpart")
    return out


def load_ldm_vae(path: str | Path, dtype=torch.float32):
    """Load ``kl16.ckpt`` (``{"model": state_dict}``, or a bare state dict) as a diffusers
    AutoencoderKL, strictly (every diffusers parameter filled, every checkpoint key used)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--vae {path}: no such file (expected MAR's KL-16 kl16.ckpt)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle / zip errors of a wrong file)
        raise ValueError(f"--vae {path}: not a loadable torch checkpoint ({err.__class__.__name__}: {err})") from err
    state = ck.get("model", ck.get("state_dict", ck)) if isinstance(ck, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"--vae {path}: expected a dict with a 'model' state dict")
    config = ldm_vae_config(state)
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_state_dict(state, config)
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"--vae {path}: conversion incomplete (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval()
