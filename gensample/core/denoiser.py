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

from .flow import eps_x0_from_velocity, twin_to_flow
from .param import PREDICTION_TYPES, cfg_combine, rescale_cfg, to_eps
from .schedule import FlowSchedule, Schedule, alpha_bar_at

FLOW = "flow"  # a flow-matching model: the network returns v = eps - x0 at x_sigma (core.flow)

Cond = Mapping[str, Any] | None


class ModelCallError(RuntimeError):
    """The network itself failed when called (a TypeError or RuntimeError raised inside its
    forward): a problem of the model or of how it is called, not of the user's options. The
    message names the model, the call (argument shapes and dtypes) and the original error; the
    CLI reports it with exit code 1."""


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return type(value).__name__


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
    prediction_type: "epsilon" | "sample" | "v_prediction", or "flow": a flow-matching model
        (velocity v = eps - x0 on x_sigma = (1 - sigma) x0 + sigma eps, timestep sigma * T). A flow
        Denoiser works on the model's VP twin (``core.flow``): it takes x_VP = x_sigma / c(sigma),
        calls the network at x_sigma = c(sigma) x_VP and returns eps = x_sigma + (1 - sigma) v, so
        every sampler's DDIM/DDPM math runs unchanged with alpha_bar = ``alpha_bar(t)``.
    schedule: a ``core.schedule.Schedule`` (alpha_bar at a model time); default: the VP table
        ``alphas_cumprod``, or for "flow" a ``FlowSchedule`` whose T is the table's length.
    null_cond: the unconditional input of CFG (the null class, or the negative / empty prompt's
        ``encoder_hidden_states`` of a text-to-image model), batch 1 or B.
    default_cond: used when a call passes ``cond=None`` (a text model needs encoder_hidden_states
        on every call; its default is the empty prompt).
    guidance_rescale: phi of rescaled CFG (Lin et al. 2024, sec. 3.4) applied by ``guided``.
    name: the model's name, for the message of a failed call (``ModelCallError``).
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
        default_cond: Cond = None,
        guidance_rescale: float = 0.0,
        name: str | None = None,
        schedule: Schedule | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES + (FLOW,):
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES + (FLOW,)}, got {prediction_type!r}")
        if prediction_type != "epsilon" and alphas_cumprod is None and schedule is None:
            raise ValueError("alphas_cumprod (or schedule) is required for prediction_type other than 'epsilon'")
        if prediction_type == FLOW and schedule is None:
            n = 1000 if alphas_cumprod is None else int(alphas_cumprod.numel())
            schedule = FlowSchedule({"num_train_timesteps": n})
        if prediction_type == FLOW and schedule.kind != FLOW:
            raise ValueError(f"prediction_type 'flow' needs a flow schedule, got a {schedule.kind!r} one")
        self.model = model
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.double()
        self.schedule = schedule
        self.prediction_type = prediction_type
        if plain_callable is None:
            plain_callable = not isinstance(model, torch.nn.Module)
        self.plain_callable = plain_callable
        self.null_cond = null_cond
        self.default_cond = default_cond
        if not 0.0 <= float(guidance_rescale) <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.guidance_rescale = float(guidance_rescale)
        self.name = name
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

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == FLOW

    def sigma(self, t) -> torch.Tensor:
        """The flow sigma of model time(s) t (flow Denoisers only); float64."""
        return self.schedule.sigma_of(torch.as_tensor(t).detach().cpu()).to(t.device if isinstance(t, torch.Tensor) else "cpu")

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule is not None and (self.is_flow or self.alphas_cumprod is None):
            return self.schedule.alpha_bar(torch.as_tensor(t).detach().cpu()).to(t.device if isinstance(t, torch.Tensor) else "cpu")
        if self.alphas_cumprod is None:
            raise ValueError("this Denoiser has no alphas_cumprod")
        return alpha_bar_at(self.alphas_cumprod.to(t.device if isinstance(t, torch.Tensor) else "cpu"), t)

    def _raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The model output in its own parameterisation, shape and dtype of the network's output.

        x_t and floating conditioning tensors are cast to the network's dtype; a TypeError or
        RuntimeError raised inside the network call becomes a ``ModelCallError``."""
        self.calls += 1
        self.rows += x_t.shape[0]
        if cond is None:
            cond = self.default_cond
        if self.plain_callable:
            out = self._call(lambda: self.model(x_t, t, cond), x_t, t, cond)
        else:
            kwargs = _batch_cond(cond, x_t.shape[0])
            dt = self.dtype
            if dt is not None and dt.is_floating_point:
                kwargs = {k: v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
                x_t = x_t if dt == torch.float64 else x_t.to(dt)
            out = self._call(lambda: self.model(x_t, t, **kwargs), x_t, t, kwargs)
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

    def _call(self, fn: Callable, x_t, t, cond):
        try:
            return fn()
        except (TypeError, RuntimeError) as err:
            if isinstance(err, ModelCallError) or "out of memory" in str(err).lower():
                raise
            who = type(self.model).__name__
            args = ", ".join([f"sample={_describe(x_t)}", f"timestep={_describe(t)}",
                              *(f"{k}={_describe(v)}" for k, v in (cond or {}).items())])
            name = f"model {self.name!r}" if self.name else "the model"
            raise ModelCallError(f"{name} failed when called as {who}({args}): {err.__class__.__name__}: {err}") from err

    def _net_state(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(sigma, the network's input) at the sampler's state x_t (t a tensor on x_t's device): for a
        flow model sigma(t) and x_sigma = c(sigma) x_VP (``core.flow.twin_to_flow``), each formed once
        per call; for a VP model (None, x_t)."""
        if not self.is_flow:
            return None, x_t
        sigma = self.sigma(t)
        return sigma, twin_to_flow(x_t, sigma)

    def raw_twin(self, x_t: torch.Tensor, t, cond: Cond = None) -> torch.Tensor:
        """The network's own output at the sampler's state x_t: ``_raw`` for a VP model; for a flow
        model x_t is the twin state x_VP, the network is called at x_sigma = c(sigma) x_VP and the
        velocity v is returned (``eps_x0`` and ``samplers.fkc.eps_and_x0(..., "flow")`` turn it into (eps, x0) on the twin)."""
        t = torch.as_tensor(t, device=x_t.device)
        return self._raw(self._net_state(x_t, t)[1], t, cond)

    def _eps_of(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, sigma, x_net: torch.Tensor) -> torch.Tensor:
        """eps_hat from a raw output ``out`` (x_t's dtype) at x_t, given ``_net_state(x_t, t)``; flow:
        eps = x_sigma + (1 - sigma) v (float64 math, x_t's dtype out)."""
        if self.is_flow:
            return eps_x0_from_velocity(out, x_net, sigma)[0].to(x_t.dtype)
        if self.prediction_type == "epsilon":
            return out
        return to_eps(out, x_t, self.alpha_bar(t.double()), self.prediction_type)

    def _cfg(self, raw: Callable, x: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float,
             uncond: Cond, phi: float) -> torch.Tensor:
        """out_u + w (out_c - out_u) of ``raw(x, t, cond)`` (the network's output, or eps), both halves
        from one batched call, then rescaled CFG with phi (``param.rescale_cfg``; phi = 0 leaves it); x's dtype.
        uncond defaults to ``null_cond``."""
        uncond = self.null_cond if uncond is None else uncond
        if uncond is None:
            raise ValueError("guidance_scale != 1 needs an unconditional input (the model has no null condition)")
        n = x.shape[0]
        t2 = torch.cat([t, t]) if t.ndim == 1 else t
        out = raw(torch.cat([x, x]), t2, concat_cond(cond, uncond, n, n)).to(x.dtype)
        out_c, out_u = out[:n], out[n:]
        return rescale_cfg(cfg_combine(out_u, out_c, guidance_scale), out_c, phi)

    def __call__(self, x_t: torch.Tensor, t, cond: Cond = None) -> torch.Tensor:
        """eps_hat at x_t (B, ...) and time t (scalar or (B,) tensor). Flow models: x_t is the VP
        twin's state and t the model time sigma * T."""
        t = torch.as_tensor(t, device=x_t.device)
        sigma, x_net = self._net_state(x_t, t)
        return self._eps_of(self._raw(x_net, t, cond).to(x_t.dtype), x_t, t, sigma, x_net)

    def eps_x0(self, x_t: torch.Tensor, t, cond: Cond = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) at x_t, each formed where the model's parameterisation gives it directly
        (flow: x_sigma + (1 - sigma) v and x_sigma - sigma v on the twin; v-prediction: sqrt(ab) v +
        sqrt(1 - ab) x and sqrt(ab) x - sqrt(1 - ab) v; sample: the output), so both stay finite at
        alpha_bar = 0 (the twin's sigma = 1) for those models; eps models divide by sqrt(alpha_bar).
        Differentiable in x_t (x_t's dtype out)."""
        t = torch.as_tensor(t, device=x_t.device)
        sigma, x_net = self._net_state(x_t, t)
        return self._eps_x0_of(self._raw(x_net, t, cond).to(x_t.dtype), x_t, t, sigma, x_net)

    def guided_eps_x0(self, x_t: torch.Tensor, t, cond: Cond, guidance_scale: float, uncond: Cond = None,
                      guidance_rescale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) of the CFG-guided model: the combination out_u + w (out_c - out_u) (and the
        rescale phi) on the raw output, as ``guided`` does, then both read off it as ``eps_x0`` does, so
        x0 stays finite at alpha_bar = 0 (a zero-terminal-SNR VP schedule's first step, a flow's sigma = 1)
        for v / sample / flow models. CFG commutes with the affine maps to eps and x0. One batched call."""
        t = torch.as_tensor(t, device=x_t.device)
        if guidance_scale == 1.0 or cond is None:
            return self.eps_x0(x_t, t, cond)
        phi = self.guidance_rescale if guidance_rescale is None else float(guidance_rescale)
        sigma, x_net = self._net_state(x_t, t)
        out = self._cfg(self._raw, x_net, t, cond, guidance_scale, uncond, phi)
        return self._eps_x0_of(out, x_t, t, sigma, x_net)

    def eps_x0_of(self, out: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) from a raw model output ``out`` at x_t (see ``eps_x0``)."""
        t = torch.as_tensor(t, device=x_t.device)
        return self._eps_x0_of(out, x_t, t, *self._net_state(x_t, t))

    def _eps_x0_of(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, sigma,
                   x_net: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``eps_x0_of`` given ``_net_state(x_t, t)``."""
        from .ddim import x0_from_eps
        from .param import x0_to_eps

        if self.is_flow:
            eps, x0 = eps_x0_from_velocity(out, x_net, sigma)
            return eps.to(x_t.dtype), x0.to(x_t.dtype)
        ab = self.alpha_bar(t.double())
        if self.prediction_type == "sample":
            return x0_to_eps(out, x_t, ab), out
        eps = out if self.prediction_type == "epsilon" else to_eps(out, x_t, ab, self.prediction_type)
        if self.prediction_type == "v_prediction":
            from .param import v_to_x0

            return eps, v_to_x0(out, x_t, ab)
        abx = ab.reshape(-1, *([1] * (x_t.ndim - 1))) if ab.ndim else ab
        return eps, x0_from_eps(x_t.double(), eps.double(), abx.to(x_t.device)).to(x_t.dtype)

    def velocity(self, x_flow: torch.Tensor, t, cond: Cond, guidance_scale: float = 1.0, uncond: Cond = None) -> torch.Tensor:
        """A flow model's own guided output at the flow state x_flow (not the twin): v_u + w (v_c - v_u)
        in one batched call (w == 1: the conditional only), as diffusers' SD3 / Flux pipelines combine
        it; what FlowMatchEulerDiscreteScheduler.step takes. Flow Denoisers only."""
        if not self.is_flow:
            raise ValueError(f"velocity() needs a flow model (prediction_type 'flow'), got {self.prediction_type!r}")
        t = torch.as_tensor(t, device=x_flow.device)
        if guidance_scale == 1.0 or cond is None:
            return self._raw(x_flow, t, cond).to(x_flow.dtype)
        return self._cfg(self._raw, x_flow, t, cond, guidance_scale, uncond, self.guidance_rescale)

    def guided(self, x_t: torch.Tensor, t, cond: Cond, guidance_scale: float, uncond: Cond = None,
               guidance_rescale: float | None = None) -> torch.Tensor:
        """CFG eps: eps_u + w (eps_c - eps_u) in one batched call; w == 1 calls the conditional only.

        uncond defaults to ``null_cond`` (null class / negative or empty prompt). With
        guidance_rescale phi > 0 (default ``self.guidance_rescale``) the combination and the
        rescale (``param.rescale_cfg``) run on the raw model output, as in diffusers, and the result
        is converted to eps; CFG itself commutes with that affine conversion."""
        if guidance_scale == 1.0 or cond is None:
            return self(x_t, t, cond)
        phi = self.guidance_rescale if guidance_rescale is None else float(guidance_rescale)
        t = torch.as_tensor(t, device=x_t.device)
        if phi == 0.0:
            return self._cfg(self, x_t, t, cond, guidance_scale, uncond, 0.0)
        sigma, x_net = self._net_state(x_t, t)
        out = self._cfg(self._raw, x_net, t, cond, guidance_scale, uncond, phi)
        return self._eps_of(out, x_t, t, sigma, x_net)

def accepts_kwarg(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_finite(x: torch.Tensor, sampler: str, step: int) -> None:
    """Stop the run on NaN/Inf with the sampler name and step index (docs/scaling.md "Bad numbers stop the run")."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{sampler}: non-finite values (NaN/Inf) in the model output at step {step}")
