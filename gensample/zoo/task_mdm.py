"""``mdm-add``: a masked-diffusion character transformer that adds two fixed-width integers.

Trained in-package by ``python -m gensample.train.task_mdm --out gensample/zoo/data/mdm-add``
(the exact command and its options are in train.json next to the weights). The prompt is
``"a+b="`` with ``D``-digit operands (leading zeros); the model fills the ``D + 1`` answer digits.
``extras["task"]`` names the task so ``gensample.eval.task_accuracy`` can check answers;
``exclude_ids`` keeps the sampler from drawing the non-digit symbols into the answer.
"""

from __future__ import annotations

import json

from ..models.masked_lm import load_mdm_folder
from . import DATA, register

MDM_ADD_DIR = DATA / "mdm-add"


def load_task_mdm(path=MDM_ADD_DIR, name: str = "mdm-add"):
    """A trained task model folder (weights, config.json, tokenizer.json, train.json) as a LoadedModel."""
    if not (path / "config.json").exists() or not (path / "train.json").exists():
        raise ValueError(f"{name} weights are missing from {path}; run "
                         f"`python -m gensample.train.task_mdm --out {path}`")
    model = load_mdm_folder(path, name=name)
    task = json.loads((path / "train.json").read_text())["task"]
    tok = model.extras["tokenizer"]
    if task.get("length") != model.extras["length"]:
        raise ValueError(f"{path}: train.json's task length {task.get('length')} != the network's {model.extras['length']}")
    model.extras["task"] = {"name": task["name"], "digits": int(task["digits"]), "prompt_length": int(task["prompt_length"])}
    model.extras["exclude_ids"] = tuple(tok.index[c] for c in tok.alphabet if not c.isdigit())
    return model


@register("mdm-add", "masked-diffusion character transformer for fixed-width addition 'a+b=' (answer checkable)")
def mdm_add():
    return load_task_mdm(MDM_ADD_DIR, "mdm-add")
