"""Float64-safe categorical and Gumbel-max draws (specs/masked_fhs.md sec. 2.5).

Zheng et al. 2024 ("Masked Diffusion Models are Secretly Time-Agnostic Masked Models and Exploit
Inaccurate Categorical Sampling", arXiv 2409.02908, sec. 4) show that Gumbel-max with float32
uniforms truncates the Gumbel tail: E = -log u >= h = -log(1 - 2^-24) ~ 5.96e-8, so a category of
probability p wins with probability about p * R(h / p), R(x) = x / (e^x - 1). Everything here runs
in float64 by default; the float32 path exists only to reproduce that artefact.

Code name -> meaning:
    generator      one ``torch.Generator`` for the whole draw, or a list with one per row
                   (row b of the output uses generator b only: batch-independent samples)
    precision      "float64" (exact) | "float32" (MDLM/SEDD emulation: float32 uniforms,
                   E = 1e-10 - log(u + 1e-10) in float32, argmax of p / E in float32)
    uniform_bits   b: quantise float64 uniforms to u <- floor(u 2^b) / 2^b and use MDLM's
                   E = 1e-10 - log(u + 1e-10) (sec. 6.6 study knob); b = 24 reproduces the float32
                   grid, None keeps all 53 bits and E = -log u
    log_w          (..., K) float64 unnormalised log-weights; -inf = excluded category
"""

from __future__ import annotations

from typing import Sequence

import torch

PRECISIONS = ("float64", "float32")
METHODS = ("gumbel", "inverse_cdf")
Generators = torch.Generator | Sequence[torch.Generator]


def _check_precision(precision: str, uniform_bits: int | None) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if uniform_bits is not None:
        if isinstance(uniform_bits, bool) or not isinstance(uniform_bits, int) or not 1 <= uniform_bits <= 53:
            raise ValueError(f"uniform_bits must be an int in [1, 53] or None, got {uniform_bits!r}")
        if precision != "float64":
            raise ValueError("uniform_bits applies to precision='float64' only")


def uniform(shape: Sequence[int], generator: Generators, *, dtype: torch.dtype = torch.float64,
            device: torch.device | str | None = None) -> torch.Tensor:
    """U[0, 1) of the given shape, drawn on CPU then moved to ``device``.

    With a list of generators, ``shape[0]`` must equal its length and row b comes from generator b.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, torch.Generator):
        u = torch.rand(shape, generator=generator, dtype=dtype)
    else:
        gens = list(generator)
        if not shape or shape[0] != len(gens):
            raise ValueError(f"got {len(gens)} generators for a draw of shape {shape}; need one per row")
        if not gens:
            u = torch.empty(shape, dtype=dtype)
        else:
            u = torch.stack([torch.rand(shape[1:], generator=g, dtype=dtype) for g in gens])
    return u if device is None else u.to(device)


def exponential_noise(shape: Sequence[int], generator: Generators, *, precision: str = "float64",
                      uniform_bits: int | None = None, device=None) -> torch.Tensor:
    """E = -log u, the Exp(1) noise of Gumbel-max (G = -log E). Float64 unless emulating float32.

    float64: u has 53 bits, so E reaches ~1e-16 (Gumbel up to ~36.7). float32 (MDLM/SEDD):
    E = 1e-10 - log(u + 1e-10) computed in float32, E >= ~5.96e-8 (Gumbel <= ~16.6).
    u = 0 gives E = +inf in float64 (that category cannot win); never E = 0 (no inf tie).
    """
    _check_precision(precision, uniform_bits)
    if precision == "float32":
        u = uniform(shape, generator, dtype=torch.float32, device=device)
        return 1e-10 - torch.log(u + 1e-10)  # float32, exactly the MDLM/SEDD expression
    u = uniform(shape, generator, dtype=torch.float64, device=device)
    if uniform_bits is not None:
        # b-bit uniforms in MDLM's expression (the emulated sampler's own guard against u = 0;
        # with plain -log(u), u = 0 would have probability 2^-b and veto a category outright)
        scale = float(2**uniform_bits)
        u = torch.floor(u * scale) / scale
        return 1e-10 - torch.log(u + 1e-10)
    return -torch.log(u)


def gumbel_argmax(log_w: torch.Tensor, generator: Generators, *, precision: str = "float64",
                  uniform_bits: int | None = None) -> torch.Tensor:
    """argmax_v w_v / E_v with E_v iid Exp(1): an exact draw from w / sum(w) (Gumbel-max).

    log_w: (..., K) unnormalised log-weights, -inf excluded. Returns (...) int64.
    float32 emulation follows MDLM's ``_sample_categorical``: w in float32, divided by E, argmax.
    """
    E = exponential_noise(log_w.shape, generator, precision=precision, uniform_bits=uniform_bits,
                          device=log_w.device)
    if precision == "float32":
        return (torch.exp(log_w.double()).float() / E).argmax(-1)
    return (log_w.double() - torch.log(E)).argmax(-1)


def inverse_cdf(log_w: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Exact float64 inverse-CDF draw: one uniform per row instead of K (sec. 2.5 'Fix').

    log_w: (..., K) unnormalised log-weights with at least one finite entry per row. Returns (...) int64.
    """
    lw = log_w.double()
    w = torch.exp(lw - lw.amax(-1, keepdim=True))  # (..., K)
    cdf = torch.cumsum(w, -1)  # (..., K)
    u = uniform(lw.shape[:-1], generator, dtype=torch.float64, device=lw.device)  # (...)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    # u * total can round up to total: fall back to the last category with positive weight
    last = lw.shape[-1] - 1 - torch.flip(w > 0, (-1,)).to(torch.int8).argmax(-1)
    return torch.minimum(idx, last)


def masked_log_softmax(logits: torch.Tensor, exclude: Sequence[int] = (), temperature: float = 1.0) -> torch.Tensor:
    """float64 log-softmax of logits / temperature with the ``exclude`` ids set to -inf.

    logits: (..., K) any float dtype (upcast to float64 *before* the softmax, sec. 7). Ids >= K are
    ignored (a network that does not score the mask needs no exclusion).
    """
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    lw = logits.double() / float(temperature)
    K = lw.shape[-1]
    ids = [int(i) for i in exclude if 0 <= int(i) < K]
    if ids:
        lw = lw.clone()
        lw[..., ids] = float("-inf")
    return torch.log_softmax(lw, -1)


def sample_categorical(logits: torch.Tensor, generator: Generators, *, exclude: Sequence[int] = (),
                       temperature: float = 1.0, method: str = "gumbel", precision: str = "float64",
                       uniform_bits: int | None = None) -> torch.Tensor:
    """Draw v ~ softmax(logits / temperature) over the last axis, never an ``exclude`` id.

    logits: (..., K); returns (...) int64. ``method``: "gumbel" (K uniforms per row) or
    "inverse_cdf" (one float64 uniform per row; precision must be float64, no uniform_bits).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_precision(precision, uniform_bits)
    log_p = masked_log_softmax(logits, exclude, temperature)
    if torch.isnan(log_p).any():
        raise ValueError("logits give no admissible category in some row (all excluded or NaN)")
    if method == "inverse_cdf":
        if precision != "float64" or uniform_bits is not None:
            raise ValueError("method='inverse_cdf' is exact float64 only; use method='gumbel' to emulate precision")
        return inverse_cdf(log_p, generator)
    return gumbel_argmax(log_p, generator, precision=precision, uniform_bits=uniform_bits)
