"""Diffusion LMs from local folders (docs/masked_lms.md, "Models and the CLI").

Registers the model prefixes ``llada:DIR`` (LLaDA / LLaDA-Instruct release layout), ``dream:DIR`` (Dream
release layout), ``dgemma:DIR`` (a transformers ``DiffusionGemmaForBlockDiffusion`` folder or a saved
``DiffusionGemmaPipeline``) and ``dlm:DIR`` (any of the three, told apart by config.json's model_type).
Importing ``gensample.models.diffusion_gemma`` also registers the DiffusionGemma pipeline family, so a
saved ``DiffusionGemmaPipeline`` folder loads as ``--model DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..models.diffusion_gemma import load_diffusion_gemma
from ..models.dream import load_dream
from ..models.llada import load_llada
from ..models.loading import register_prefix

DLM_LOADERS = {"llada": load_llada, "dream": load_dream, "diffusion_gemma": load_diffusion_gemma}


def load_dlm(path: str):
    """``--model dlm:DIR``: LLaDA, Dream or DiffusionGemma, by config.json's ``model_type``."""
    cfg_file = Path(path) / "config.json"
    try:
        model_type = str(json.loads(cfg_file.read_text()).get("model_type", ""))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--model dlm:{path}: no readable config.json in that folder ({err.__class__.__name__})") from None
    loader = DLM_LOADERS.get(model_type.lower())
    if loader is None:
        raise ValueError(f"--model dlm:{path}: config.json has model_type {model_type!r}; allowed: "
                         "'llada', 'Dream', 'diffusion_gemma'")
    return loader(path, name=f"dlm:{path}")


register_prefix("llada", load_llada, "LLaDA / LLaDA-Instruct folder (release layout; plain-PyTorch network, no remote code)")
register_prefix("dream", load_dream, "Dream folder (release layout; plain-PyTorch network, no remote code)")
register_prefix("dgemma", load_diffusion_gemma, "DiffusionGemmaForBlockDiffusion folder (transformers native) or saved DiffusionGemmaPipeline")
register_prefix("dlm", load_dlm, "a LLaDA, Dream or DiffusionGemma folder, by config.json's model_type")
