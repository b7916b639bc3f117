"""Random-weight OMS folders in the layout of the released ones (h1t/oms_b_openclip_15_21), offline.

    model_index.json
    oms_module/config.json                         UNet2DConditionModel-style config, foreign _class_name
    oms_module/diffusion_pytorch_model.fp16.safetensors   the only weights file (fp16 variant)
    oms_text_encoder/config.json                   pointer: {"_name_or_path": SD-2.x folder, "subfolder": "text_encoder"}
    oms_tokenizer/config.json                      pointer: {"_name_or_path": SD-2.x folder, "subfolder": "tokenizer"}

The OMS-B release uses SD 2.1's text encoder (OpenCLIP ViT-H, 1024-dim) for every base, so its
text folders point at an SD 2.x pipeline; here they point at a tiny random SD 2.x folder from
``tests/sd_models.py`` (hidden size 32, like the tiny SD 1.x base, so both the own encoder and
the fallback to the base's encoder fit the module). ``text="none"`` leaves the text folders out
(the OMS pipeline then falls back to the base pipeline's text encoder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gensample.models.oms import OMS_B_CONFIG, OMSModule

# OMS-B's block layout at toy width; cross_attention_dim = the tiny CLIP's hidden size (32).
TINY_TEXT_OMS = dict(OMS_B_CONFIG, block_out_channels=[8, 16, 16], attention_head_dim=[2, 2, 2], cross_attention_dim=32,
                     norm_num_groups=4, sample_size=8, layers_per_block=1)

MODEL_INDEX = {
    "_class_name": ["pipeline_oms", "OMSPipeline"],
    "_diffusers_version": "0.24.0",
    "oms_module": ["unet_2d_condition_woct", "UNet2DConditionWoCTModel"],
    "oms_text_encoder": ["transformers", "CLIPTextModel"],
    "oms_tokenizer": ["transformers", "CLIPTokenizer"],
}


def tiny_text_oms(seed: int = 1, **overrides) -> OMSModule:
    torch.manual_seed(seed)
    return OMSModule(**dict(TINY_TEXT_OMS, **overrides)).eval()


def write_oms_release(folder: Path, text_target: Path | None = None, seed: int = 1, **overrides) -> OMSModule:
    """Write a random OMS-B-layout release to ``folder``; return the module with the fp16-rounded
    weights that were written (float32). ``text_target``: the SD 2.x-layout folder the text
    pointers name (None: no text folders)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    module = tiny_text_oms(seed, **overrides)
    mdir = folder / "oms_module"
    mdir.mkdir(parents=True, exist_ok=True)
    index = dict(MODEL_INDEX)
    if text_target is None:
        index.pop("oms_text_encoder")
        index.pop("oms_tokenizer")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    cfg = dict(module.config)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(_class_name="UNet2DConditionWoCTModel", _diffusers_version="0.24.0", _name_or_path=str(folder),
               time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0)  # keys of the UNet config it came from
    (mdir / "config.json").write_text(json.dumps(cfg, indent=2))
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    save_file(half, str(mdir / "diffusion_pytorch_model.fp16.safetensors"))
    if text_target is not None:
        for sub, cls, target in (("oms_text_encoder", "CLIPTextModel", "text_encoder"),
                                 ("oms_tokenizer", "CLIPTokenizer", "tokenizer")):
            (folder / sub).mkdir(exist_ok=True)
            (folder / sub / "config.json").write_text(json.dumps(
                {"_class_name": cls, "_name_or_path": str(text_target), "subfolder": target}, indent=2))
    module.load_state_dict({k: v.float() for k, v in half.items()})
    return module
