"""The One More Step module psi(x_T', c) (Hu et al., "One More Step: A Versatile Plug-and-Play
Module for Rectifying Diffusion Schedule Flaws and Enhancing Low-Frequency Controls", CVPR 2024,
arXiv 2311.15744; docs/oms.md "Python" and "Released checkpoints").

psi is a UNet2DConditionModel *without* a time embedding (the paper's module sees no timestep:
it always acts at the virtual time T' where alpha_bar = 0): there is no ``time_proj`` /
``time_embedding`` and every resnet has ``temb_channels=None``, so the state-dict keys are
exactly diffusers' UNet2DConditionModel keys minus ``time_embedding.*`` and every
``*.time_emb_proj.*``. A released OMS folder (e.g. h1t/oms_b_openclip_15_21) keeps the module
in the subfolder ``oms_module`` (config.json + ``diffusion_pytorch_model.fp16.safetensors``,
only the fp16 variant), so ``OMSModule.from_pretrained(folder / "oms_module", variant="fp16")``
loads it; ``load_oms_release`` loads the whole folder (module, text encoder, tokenizer) with
errors that name the file looked for.

Output: v-prediction at zero SNR, i.e. v_T' = -x0 (the paper's training target at T'); the step
that turns it into x_T lives in ``gensample.samplers.oms``.

Small variant for our own models: ``num_class_embeds`` adds an ``nn.Embedding`` whose row for
label c is used as a one-token ``encoder_hidden_states`` (B, 1, cross_attention_dim), so the
class drives the same cross-attention path a text embedding drives in the released module.
The last label (``num_class_embeds - 1``) is the null class used for OMS-CFG.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_mid_block, get_up_block
from diffusers.utils import BaseOutput
from torch import nn

# OMS-B (h1t/oms_b_openclip_15_21, h1t/oms_b_openclip_xl: the released config.json), docs/oms.md.
OMS_B_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [160, 320, 640],
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 1024,
}

# The small class-conditional variant trained by `gensample train oms` on 16x16x1 pixels: the
# class token enters through cross-attention at the coarsest level (psi* = -E[x0|c] needs no more).
SMALL_CONFIG = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [16, 16, 32],
    "layers_per_block": 1,
    "attention_head_dim": [2, 2, 2],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}


@dataclass
class OMSModuleOutput(BaseOutput):
    """sample: (B, C, H, W) v-prediction at zero SNR (v = -x0_hat)."""

    sample: torch.Tensor


class OMSModule(ModelMixin, ConfigMixin):
    """psi_phi(x_T', c): a time-free conditional UNet (docs/oms.md "Python").

    Call: ``psi(sample, encoder_hidden_states=None, class_labels=None)``; give
    ``encoder_hidden_states`` (B, L, cross_attention_dim) for text-conditioned modules or
    ``class_labels`` (B,) int64 for the class-conditional variant.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[int] = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: Tuple[str, ...] = tuple(OMS_B_CONFIG["down_block_types"]),
        up_block_types: Tuple[str, ...] = tuple(OMS_B_CONFIG["up_block_types"]),
        mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn",
        block_out_channels: Tuple[int, ...] = (160, 320, 640),
        layers_per_block: int = 2,
        transformer_layers_per_block: Union[int, Tuple[int, ...]] = 1,
        attention_head_dim: Union[int, Tuple[int, ...]] = (5, 10, 20),
        num_attention_heads: Optional[Union[int, Tuple[int, ...]]] = None,
        cross_attention_dim: int = 1024,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        act_fn: str = "silu",
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        num_class_embeds: Optional[int] = None,
    ):
        super().__init__()
        n_blocks = len(block_out_channels)
        if len(down_block_types) != n_blocks or len(up_block_types) != n_blocks:
            raise ValueError(
                f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) and "
                f"block_out_channels ({n_blocks}) must have the same length"
            )
        if num_class_embeds is not None and num_class_embeds < 2:
            raise ValueError(f"num_class_embeds must be None or >= 2 (classes + null), got {num_class_embeds}")
        # diffusers' UNet2DConditionModel reads attention_head_dim as the head *count*.
        heads = num_attention_heads or attention_head_dim
        heads = (heads,) * n_blocks if isinstance(heads, int) else tuple(heads)
        tlayers = transformer_layers_per_block
        tlayers = (tlayers,) * n_blocks if isinstance(tlayers, int) else tuple(tlayers)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.class_embedding = nn.Embedding(num_class_embeds, cross_attention_dim) if num_class_embeds else None

        self.down_blocks = nn.ModuleList([])
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, transformer_layers_per_block=tlayers[i],
                in_channels=in_ch, out_channels=out_ch, temb_channels=None,
                add_downsample=i < n_blocks - 1, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups, cross_attention_dim=cross_attention_dim,
                num_attention_heads=heads[i], downsample_padding=downsample_padding,
                use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                attention_head_dim=out_ch // heads[i],
            ))
        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = get_mid_block(
                mid_block_type, temb_channels=None, in_channels=block_out_channels[-1], resnet_eps=norm_eps,
                resnet_act_fn=act_fn, resnet_groups=norm_num_groups, output_scale_factor=mid_block_scale_factor,
                transformer_layers_per_block=tlayers[-1], num_attention_heads=heads[-1],
                cross_attention_dim=cross_attention_dim, use_linear_projection=use_linear_projection,
                upcast_attention=upcast_attention, attention_head_dim=block_out_channels[-1] // heads[-1],
            )

        self.up_blocks = nn.ModuleList([])
        rev_ch = list(reversed(block_out_channels))
        rev_heads, rev_tlayers = list(reversed(heads)), list(reversed(tlayers))
        out_ch = rev_ch[0]
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch = out_ch, rev_ch[i]
            in_ch = rev_ch[min(i + 1, n_blocks - 1)]
            self.up_blocks.append(get_up_block(
                block_type, num_layers=layers_per_block + 1, transformer_layers_per_block=rev_tlayers[i],
                in_channels=in_ch, out_channels=out_ch, prev_output_channel=prev_ch, temb_channels=None,
                add_upsample=i < n_blocks - 1, resnet_eps=norm_eps, resnet_act_fn=act_fn, resolution_idx=i,
                resnet_groups=norm_num_groups, cross_attention_dim=cross_attention_dim,
                num_attention_heads=rev_heads[i], use_linear_projection=use_linear_projection,
                upcast_attention=upcast_attention, attention_head_dim=out_ch // rev_heads[i],
            ))
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    @property
    def null_class(self) -> Optional[int]:
        n = self.config.num_class_embeds
        return None if not n else n - 1

    def condition(self, encoder_hidden_states=None, class_labels=None) -> torch.Tensor:
        """The cross-attention context (B, L, D): the given embeddings, or one class token."""
        if encoder_hidden_states is not None:
            return encoder_hidden_states
        if class_labels is None:
            raise ValueError("OMSModule needs encoder_hidden_states (B, L, D) or class_labels (B,)")
        if self.class_embedding is None:
            raise ValueError("class_labels given but this OMSModule has no class embedding (num_class_embeds=None)")
        labels = torch.as_tensor(class_labels, device=self.conv_in.weight.device).long().reshape(-1)
        n = self.config.num_class_embeds
        if labels.numel() and (labels.min() < 0 or labels.max() >= n):
            raise ValueError(f"class_labels must be in [0, {n - 1}] ({n - 1} is the null class), got {labels.tolist()}")
        return self.class_embedding(labels)[:, None, :]  # (B, 1, D)

    def forward(self, sample: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None, return_dict: bool = True):
        """v_hat = psi(x_T', c) at zero SNR; sample: (B, C, H, W) pure noise x_T'."""
        context = self.condition(encoder_hidden_states, class_labels).to(sample.dtype)
        if context.shape[0] == 1 and sample.shape[0] > 1:
            context = context.expand(sample.shape[0], *context.shape[1:])
        h = self.conv_in(sample)
        skips = (h,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=None, encoder_hidden_states=context)
            else:
                h, res = block(hidden_states=h, temb=None)
            skips += res
        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                h = self.mid_block(h, None, encoder_hidden_states=context)
            else:
                h = self.mid_block(h, None)
        for i, block in enumerate(self.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if i < len(self.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=None, res_hidden_states_tuple=res, encoder_hidden_states=context,
                          upsample_size=size)
            else:
                h = block(hidden_states=h, temb=None, res_hidden_states_tuple=res, upsample_size=size)
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        if not return_dict:
            return (h,)
        return OMSModuleOutput(sample=h)


def small_oms_module(in_channels: int = 1, num_classes: int = 3, **overrides) -> OMSModule:
    """The small class-conditional variant (num_classes + 1 embeddings: the last is null)."""
    cfg = dict(SMALL_CONFIG, in_channels=in_channels, out_channels=in_channels, num_class_embeds=num_classes + 1)
    cfg.update(overrides)
    return OMSModule(**cfg)


# -- released checkpoints ------------------------------------------------------------------------
# The layout of a released OMS folder (docs/oms.md "Released checkpoints"):
#   model_index.json
#   oms_module/config.json + diffusion_pytorch_model.fp16.safetensors   (the module, fp16 only)
#   oms_text_encoder/config.json   weights, or a pointer {"_name_or_path": REPO, "subfolder": DIR}
#   oms_tokenizer/...              tokenizer files, or the same kind of pointer
# With no oms_text_encoder / oms_tokenizer the base pipeline's text encoder is used (as the
# reference pipeline does).
MODULE_SUBFOLDER = "oms_module"
TEXT_ENCODER_SUBFOLDER = "oms_text_encoder"
TOKENIZER_SUBFOLDER = "oms_tokenizer"
WEIGHTS_NAME = "diffusion_pytorch_model"
_TEXT_WEIGHTS = ("model", "pytorch_model")
_TOKENIZER_FILES = ("vocab.json", "tokenizer.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class OMSRelease:
    """A loaded OMS folder: the module, its own text encoder and tokenizer (None: use the base
    pipeline's), and where each came from (for run.json)."""

    module: OMSModule
    text_encoder: Any = None
    tokenizer: Any = None
    sources: dict = field(default_factory=dict)


def _weight_name(variant: Optional[str], ext: str, stem: str = WEIGHTS_NAME) -> str:
    return f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"


def module_weights_file(module_dir: Path, variant: Optional[str], flag: str = "--oms-module") -> Path:
    """The weights file ``from_pretrained(module_dir, variant=variant)`` reads; ValueError naming
    the file looked for (and the variants that are there) when it is missing."""
    for ext in ("safetensors", "bin"):
        f = module_dir / _weight_name(variant, ext)
        if f.is_file():
            return f
    want = module_dir / _weight_name(variant, "safetensors")
    found = sorted(p.name for p in module_dir.glob(f"{WEIGHTS_NAME}*") if p.is_file())
    hint = ""
    variants = sorted({p.split(".")[1] for p in found if p.count(".") == 2})
    if variants and variant not in variants:
        hint = f"; this folder holds the {', '.join(variants)} variant: pass --oms-variant {variants[0]}"
    elif not variants and found and variant:
        hint = "; this folder holds no variant: leave out --oms-variant"
    raise ValueError(f"{flag}: no OMS weights {want} (found: {found or 'no weights file'}){hint}")


def _strict_check(module: OMSModule, weights: Path) -> None:
    """Every weight in the file is a parameter of the module and vice versa (a strict load)."""
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            keys = set(f.keys())
    else:
        keys = set(torch.load(str(weights), map_location="cpu", weights_only=True))
    own = set(module.state_dict())
    missing, unexpected = sorted(own - keys), sorted(keys - own)
    if missing or unexpected:
        raise ValueError(f"{weights}: the weights do not match the OMS module of its config.json "
                         f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})")


def load_module_folder(module_dir: Path, variant: Optional[str] = None, flag: str = "--oms-module") -> OMSModule:
    """An OMSModule from a folder with config.json + weights (float32, eval mode, strict keys)."""
    module_dir = Path(module_dir)
    if not (module_dir / "config.json").is_file():
        raise ValueError(f"{flag}: no {module_dir / 'config.json'}")
    weights = module_weights_file(module_dir, variant, flag)
    try:
        module = OMSModule.from_pretrained(str(module_dir), variant=variant, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise ValueError(f"{flag}: cannot load the OMS module from {weights} "
                         f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    _strict_check(module, weights)
    return module.eval()


def _resolve_pointer(root: Path, folder: Path) -> tuple[str, dict]:
    """(path or hub id, from_pretrained kwargs) of a text-encoder / tokenizer subfolder: the folder
    itself when it holds the files, else the ``_name_or_path`` + ``subfolder`` its config.json names."""
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if "SDXL" in str(cfg.get("_class_name", "")):
        raise ValueError(f"{cfg_file}: dual SDXL text encoders (OMS-L) are not read from the release; on an SDXL "
                         f"model pass --oms-text-encoder base (psi then attends to the base's two encoders' "
                         f"penultimate states); OMS-B modules (one CLIP text encoder) load their own")
    target = cfg.get("_name_or_path")
    own = [p for p in folder.iterdir() if p.name != "config.json"] if folder.is_dir() else []
    if own or not target:
        return str(folder), {}
    kwargs = {"subfolder": cfg["subfolder"]} if cfg.get("subfolder") else {}
    local = root / target
    return (str(local) if local.exists() else str(target)), kwargs


def _load_text_part(root: Path, name: str, variant: Optional[str]):
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = root / name
    where, kwargs = _resolve_pointer(root, folder)
    label = where + (f" (subfolder {kwargs['subfolder']})" if kwargs else "")
    try:
        if name == TOKENIZER_SUBFOLDER:
            return CLIPTokenizer.from_pretrained(where, **kwargs), label
        try:
            enc = CLIPTextModel.from_pretrained(where, variant=variant, torch_dtype=torch.float32, **kwargs)
        except (OSError, ValueError):
            if variant is None:
                raise
            enc = CLIPTextModel.from_pretrained(where, torch_dtype=torch.float32, **kwargs)  # the target has no such variant
        return enc.eval(), label
    except (OSError, ValueError) as err:
        raise ValueError(f"--oms-module: cannot load {name} from {label} (named by {folder}) "
                         f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def _hub_release(repo_id: str, variant: Optional[str]) -> Path:
    """Download a released OMS folder (only the requested weight variant)."""
    patterns = ["model_index.json", f"{MODULE_SUBFOLDER}/config.json",
                f"{MODULE_SUBFOLDER}/{_weight_name(variant, 'safetensors')}",
                f"{TEXT_ENCODER_SUBFOLDER}/*", f"{TOKENIZER_SUBFOLDER}/*"]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - offline, unknown or gated repository: one message
        raise ValueError(f"--oms-module {repo_id!r}: not a local folder, and as a hub id it could not be fetched "
                         f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def load_oms_release(spec: str, variant: Optional[str] = None, text: bool = True) -> OMSRelease:
    """An OMS module from a released folder (``oms_module/`` + optional ``oms_text_encoder/`` and
    ``oms_tokenizer/``), a bare module folder (config.json + weights), or a hub id of a release.

    variant: the weights variant (``"fp16"``: the releases ship only
    ``diffusion_pytorch_model.fp16.safetensors``). Weights are upcast to float32. Every failure is
    a ValueError naming the file or id it looked for. text=False skips the text folders.
    """
    path = Path(spec)
    if not path.exists():
        if not _HUB_ID.fullmatch(spec):
            raise ValueError(f"--oms-module {spec}: no such folder (a released OMS folder with {MODULE_SUBFOLDER}/, "
                             f"a module folder with config.json, a zoo OMS name or a hub id)")
        path = _hub_release(spec, variant)
    if not path.is_dir():
        raise ValueError(f"--oms-module {spec}: must be a folder, got a file")
    if (path / MODULE_SUBFOLDER).is_dir():
        module = load_module_folder(path / MODULE_SUBFOLDER, variant)
        release = OMSRelease(module=module, sources={"module": str(path / MODULE_SUBFOLDER)})
        has_enc, has_tok = (path / TEXT_ENCODER_SUBFOLDER).is_dir(), (path / TOKENIZER_SUBFOLDER).is_dir()
        if has_enc != has_tok:
            raise ValueError(f"--oms-module {spec}: {TEXT_ENCODER_SUBFOLDER}/ and {TOKENIZER_SUBFOLDER}/ come together; "
                             f"found only {TEXT_ENCODER_SUBFOLDER if has_enc else TOKENIZER_SUBFOLDER}/")
        if has_enc and text:
            release.text_encoder, release.sources["text_encoder"] = _load_text_part(path, TEXT_ENCODER_SUBFOLDER, variant)
            release.tokenizer, release.sources["tokenizer"] = _load_text_part(path, TOKENIZER_SUBFOLDER, variant)
        return release
    if (path / "config.json").is_file():
        return OMSRelease(module=load_module_folder(path, variant), sources={"module": str(path)})
    raise ValueError(f"--oms-module {spec}: found neither {path / MODULE_SUBFOLDER / 'config.json'} (a released OMS "
                     f"folder) nor {path / 'config.json'} (a module folder)")
