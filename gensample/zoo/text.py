"""Masked-diffusion text models: the exact Markov toy chain and our trained character MDM.

Also registers the model prefixes ``markov:FILE.json`` (an exact Markov-chain language),
``mlm:PATH`` (a local transformers masked-LM folder) and ``mdlm:PATH_OR_ID`` (MDLM's DiT from a
hub-layout folder, a hub id or a Lightning .ckpt) with ``models.loading``.
"""

from __future__ import annotations

from ..models.loading import register_prefix
from ..models.markov import load_markov_file, markov_model, toy_chain
from ..models.masked_lm import load_hf_masked_lm, load_mdm_folder
from ..models.mdlm import load_mdlm
from . import DATA, register

MDM_TEXT_DIR = DATA / "mdm-text"

register_prefix("markov", load_markov_file, "an exact Markov-chain language from JSON (initial, transition, length)")
register_prefix("mlm", load_hf_masked_lm, "a local transformers masked-LM folder (model + tokenizer) as a masked diffusion model")
register_prefix("mdlm", load_mdlm, "MDLM (Sahoo et al. 2024) DiT: hub folder/id (config.json + model.safetensors) or Lightning .ckpt")


@register("markov-toy", "exact Markov-chain language, 3 tokens, length 4 (masked-diffusion oracle)")
def markov_toy():
    return markov_model("markov-toy", toy_chain())


@register("mdm-text", "masked-diffusion character transformer trained on stdlib docstrings (length 64)")
def mdm_text():
    if not (MDM_TEXT_DIR / "config.json").exists():
        raise ValueError(f"mdm-text weights are missing from {MDM_TEXT_DIR}; run `gensample train mdm`")
    return load_mdm_folder(MDM_TEXT_DIR, name="mdm-text")
