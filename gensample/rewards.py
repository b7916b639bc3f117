"""Reward plug-ins for reward-guided sampling (FK steering, docs/fk_steering.md "Rewards").

A reward is any callable ``fn(x0_hat, prompts=None) -> (N,) tensor``: x0_hat is an (N, ...) batch in
the model's sample space (the mixture's vectors, or pixels in [-1, 1] for pixel models), prompts
an optional list of N strings (text models; unused by the built-ins). Higher is better; the sampler
targets p(x0) exp(lambda r(x0)).

Given by name (``resolve_reward``):

- ``quadratic:c=C,s=S``: r(x) = -||x - c||^2 / (2 s^2), c a number (every coordinate) or
  coordinates separated by ``;`` (``c=1;-2``); s > 0. With a Gaussian-mixture prior the tilted law
  is again a Gaussian mixture (the exact oracle, docs/fk_steering.md "Oracle").
- ``digits-classifier:C``: log p(C | x) of the embedded digits classifier (gensample.eval.digits),
  x an (N, 1, 8, 8) image in [-1, 1] (x0_hat is clipped to [-1, 1] first).
- ``module:function``: ``function`` of an importable module (PYTHONPATH), called as above.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import torch

BUILTINS = ("quadratic", "digits-classifier")


class QuadraticReward:
    """r(x) = -||x - c||^2 / (2 s^2), summed over every element of a sample. Returns (N,) float64."""

    def __init__(self, c, s: float = 1.0):
        center = torch.as_tensor(c, dtype=torch.float64)
        if center.ndim > 1 or not torch.isfinite(center).all():
            raise ValueError(f"quadratic reward: c must be a finite number or a list of finite numbers, got {c!r}")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"quadratic reward: s must be a finite number > 0, got {s!r}")
        self.c, self.s = center, float(s)

    def __call__(self, x0_hat: torch.Tensor, prompts=None) -> torch.Tensor:
        x = x0_hat.double().flatten(1)  # (N, D)
        c = self.c.to(x.device)
        if c.ndim == 1 and c.numel() != x.shape[1]:
            raise ValueError(f"quadratic reward: c has {c.numel()} coordinates, the samples have {x.shape[1]}")
        return -((x - c) ** 2).sum(1) / (2 * self.s**2)

    def __repr__(self) -> str:
        return f"quadratic(c={self.c.tolist()}, s={self.s:g})"


class DigitsClassifierReward:
    """r(x) = log p(label | x) of the shipped digits CNN (gensample.eval.digits), x clipped to [-1, 1].

    x0_hat: (N, 1, 8, 8). Returns (N,) float64."""

    def __init__(self, label: int):
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
            raise ValueError(f"digits-classifier reward: the class must be an integer in [0, 9], got {label!r}")
        self.label = label

    def __call__(self, x0_hat: torch.Tensor, prompts=None) -> torch.Tensor:
        from .eval.digits import _as_images, _net

        x = _as_images(x0_hat.detach().clamp(-1.0, 1.0), "x0_hat")  # (N, 1, 8, 8) float32 CPU
        with torch.no_grad():
            logits = _net()(x).double()  # (N, 10)
        return torch.log_softmax(logits, 1)[:, self.label].to(x0_hat.device)

    def __repr__(self) -> str:
        return f"digits-classifier({self.label})"


def _parse_quadratic(args: str) -> QuadraticReward:
    fields = {}
    for part in filter(None, args.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("c", "s"):
            raise ValueError(f"--reward quadratic takes c=C,s=S (C a number or numbers separated by ';'), got {args!r}")
        fields[key.strip()] = value.strip()
    if "c" not in fields:
        raise ValueError(f"--reward quadratic needs c=C (the reward's centre), got {args!r}")
    try:
        c = [float(v) for v in fields["c"].split(";")]
        s = float(fields.get("s", "1"))
    except ValueError:
        raise ValueError(f"--reward quadratic: c and s must be numbers, got {args!r}") from None
    return QuadraticReward(c[0] if len(c) == 1 else c, s)


def _parse_digits(args: str) -> DigitsClassifierReward:
    try:
        label = int(args)
    except ValueError:
        raise ValueError(f"--reward digits-classifier:C needs a class C in 0..9, got {args!r}") from None
    return DigitsClassifierReward(label)


_FACTORIES = {"quadratic": _parse_quadratic, "digits-classifier": _parse_digits}


def resolve_reward(spec) -> Callable:
    """A reward callable from ``spec``: a callable (returned as is), ``NAME:ARGS`` of a built-in
    (``BUILTINS``), or ``module:function`` importable from PYTHONPATH."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--reward must be a callable, NAME:ARGS (one of {list(BUILTINS)}) or module:function, got {spec!r}")
    name, sep, args = spec.strip().partition(":")
    if name in _FACTORIES:
        if not sep:
            raise ValueError(f"--reward {name} needs arguments: "
                             + ("quadratic:c=C,s=S" if name == "quadratic" else "digits-classifier:C (a class 0..9)"))
        return _FACTORIES[name](args)
    if not sep or not args:
        raise ValueError(f"--reward must be NAME:ARGS (one of {list(BUILTINS)}) or module:function, got {spec!r}")
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ValueError(f"--reward {spec!r}: cannot import module {name!r} ({err}); is it on PYTHONPATH?") from None
    fn = getattr(module, args, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: module {name!r} has no callable {args!r}")
    return fn
