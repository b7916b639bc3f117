"""`mar-digits`: a tiny MAR (transformer backbone + AdaLN-MLP diffusion head) on 8x8 sklearn digits.

Trained by `gensample train mar` (gensample/cli/cmd_mar.py); weights, the exact command and the loss
curve live in gensample/zoo/data/mar-digits/. Used by the `disa` and `mar` samplers (specs/disa.md sec. 8).
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
