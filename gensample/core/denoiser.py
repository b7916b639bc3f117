"""The one internal convention: a Denoiser maps (x_t, t, cond) -> eps_hat.

Adapters at the edge (k-diffusion's `external.py` idea) turn any diffusers UNet
(`UNet2DModel` with or without `class_labels`, `UNet2DConditionModel` with
`encoder_hidden_states`), our analytic models, or a plain callable into that convention, whatever
its ``prediction_type``. Conditioning is a dict of model keyword arguments
(``{"class_labels": LongTensor[B]}`` or ``{"encoder_hidden_states": Tensor[B, L, D]}``), or None.
No diffusers import: duck typing on the call signature.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch

from .param import PREDICTION_TYPES, cfg_combine, to_eps
from .schedule import alpha_bar_at

Cond = Mapping[str, Any] | None


def _batch_cond(cond: Cond, n: int) -> dict:
    """Repeat scalar-ish conditioning entries to batch size n (tensors of batch 1 are expanded)."""
    out = {}
    for key, val in (cond or {}).items():
        if isinstance(val, torch.Tensor) and val.ndim >= 1 and val.shape[0] == 1 and n > 1:
            val = val.expand(n, *val.shape[1:])
        out[key] = val
    return out


def concat_cond(a: Cond, b: Cond, n_a: int, n_b: int) -> dict:
    """Concatenate two conditionings along the batch (for one batched CFG call)."""
    a, b = _batch_cond(a, n_a), _batch_cond(b, n_b)
    if set(a) != set(b):
        raise ValueError(f"conditional and unconditional inputs differ in keys: {sorted(a)} vs {sorted(b)}")
    return {k: torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else a[k] for k in a}


class Denoiser:
    """eps_hat(x_t, t, cond) for a VP model.

    model: a diffusers-style module called as ``model(sample, timestep, **cond)`` returning an
        object with ``.sample`` (or a tuple / tensor), or a plain callable ``f(x, t, cond)``
        (set ``plain_callable=True``).
    alphas_cumprod: (T,) training schedule, needed for non-epsilon prediction types.
    prediction_type: "epsilon" | "sample" | "v_prediction".
    nfe counts model *sample evaluations* (rows of a batched call are counted once per call;
    ``calls`` counts invocations, ``rows`` the total batch rows).
    """

    def __init__(
        self,
        model: Callable,
        alphas_cumprod: torch.Tensor | None = None,
        prediction_type: str = "epsilon",
        plain_callable: bool | None = None,
        null_cond: Cond = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type != "epsilon" and alphas_cumprod is None:
            raise ValueError("alphas_cumprod is required for prediction_type other than 'epsilon'")
        self.model = model
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.double()
        self.prediction_type = prediction_type
        if plain_callable is None:
            plain_callable = not isinstance(model, torch.nn.Module)
        self.plain_callable = plain_callable
        self.null_cond = null_cond
        self.calls = 0
        self.rows = 0

    # -- helpers ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype | None:
        """The network's parameter dtype (inputs are cast to it); None for plain callables."""
        try:
            return next(self.model.parameters()).dtype  # type: ignore[union-attr]
        except (AttributeError, StopIteration, TypeError):
            return None

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.alphas_cumprod is None:
            raise ValueError("this Denoiser has no alphas_cumprod")
        return alpha_bar_at(self.alphas_cumprod.to(t.device if isinstance(t, torch.Tensor) else "cpu"), t)

    def _raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        if self.plain_callable:
            out = self.model(x_t, t, cond)
        else:
            out = self.model(x_t, t, **_batch_cond(cond, x_t.shape[0]))
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model returned {type(out).__name__}, expected a tensor or an object with .sample")
        # Learned-variance UNets return 2C channels: keep the mean half.
        if out.ndim == x_t.ndim and out.ndim >= 2 and out.shape[1] == 2 * x_t.shape[1] and out.shape[2:] == x_t.shape[2:]:
            out = out[:, : x_t.shape[1]]
        if out.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} does not match input shape {tuple(x_t.shape)}")
        return out

    def __call__(self, x_t: torch.Tensor, t, cond: Cond = None) -> torch.Tensor:
        """eps_hat at x_t (B, ...) and time t (scalar or (B,) tensor)."""
        t = torch.as_tensor(t, device=x_t.device)
        model_in = x_t if self.dtype is None or self.dtype == torch.float64 else x_t.to(self.dtype)
        out = self._raw(model_in, t, cond).to(x_t.dtype)
        if self.prediction_type == "epsilon":
            return out
        return to_eps(out, x_t, self.alpha_bar(t.double()), self.prediction_type)

    def guided(self, x_t: torch.Tensor, t, cond: Cond, guidance_scale: float, uncond: Cond = None) -> torch.Tensor:
        """CFG eps: eps_u + w (eps_c - eps_u) in one batched call; w == 1 calls the conditional only."""
        if guidance_scale == 1.0 or cond is None:
            return self(x_t, t, cond)
        uncond = self.null_cond if uncond is None else uncond
        if uncond is None:
            raise ValueError("guidance_scale != 1 needs an unconditional input (the model has no null condition)")
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t2 = torch.cat([t, t]) if t.ndim == 1 else t
        eps = self(torch.cat([x_t, x_t]), t2, concat_cond(cond, uncond, n, n))
        eps_c, eps_u = eps[:n], eps[n:]
        return cfg_combine(eps_u, eps_c, guidance_scale)


def accepts_kwarg(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_finite(x: torch.Tensor, sampler: str, step: int) -> None:
    """Stop the run on NaN/Inf with the sampler name and step index (DESIGN.md conventions)."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{sampler}: non-finite values (NaN/Inf) in the model output at step {step}")
