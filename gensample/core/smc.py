"""Sequential Monte Carlo bookkeeping: log-weights, ESS and resampling, per particle group.

Used by the Feynman-Kac correctors (Skreta et al., ICML 2025, arXiv 2503.02819, Sec. 4 and Alg. 1; docs/fkc.md).
Resampling schemes follow Douc, Cappe & Moulines (2005), "Comparison of resampling schemes for
particle filtering": multinomial, stratified, systematic, residual.

Layout: particles live as a flat batch of ``G * K`` rows, group-major (rows ``g*K .. g*K+K-1``
are the K particles of group g: one prompt / class / target). Log-weights are ``(G, K)`` float64.
Particles resample **only within their group**. Every draw comes from an explicit
``torch.Generator`` per group (CPU or CUDA; each draw is made on the generator's device, then
moved), so results do not depend on batch composition or on the particles' device.

| code name      | symbol                                        |
|----------------|-----------------------------------------------|
| ``log_w``      | log w^(k), unnormalised, (G, K)               |
| ``w_bar``      | normalised weights softmax(log_w), (G, K)     |
| ``ess``        | 1 / sum_k w_bar_k^2 = exp(2 LSE(lw) - LSE(2 lw)) |
"""

from __future__ import annotations

from typing import Sequence

import torch

SCHEMES = ("systematic", "multinomial", "stratified", "residual")


def _check_log_w(log_w: torch.Tensor) -> torch.Tensor:
    if not isinstance(log_w, torch.Tensor):
        raise TypeError(f"log_w must be a torch.Tensor of shape (G, K), got {type(log_w).__name__}")
    if log_w.ndim != 2 or log_w.shape[1] < 1:
        raise ValueError(f"log_w must have shape (G, K) with K >= 1, got {tuple(log_w.shape)}")
    lw = log_w.double()
    if torch.isnan(lw).any() or (lw == float("inf")).any():
        raise ValueError("log_w must not contain NaN or +inf")
    if (lw == float("-inf")).all(1).any():
        raise ValueError("log_w has a group whose weights are all zero (every entry -inf)")
    return lw


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """w_bar = softmax(log_w) within each group. (G, K) -> (G, K) float64."""
    lw = _check_log_w(log_w)
    return torch.softmax(lw - lw.max(1, keepdim=True).values, 1)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """ESS = exp(2 LSE(log_w) - LSE(2 log_w)) per group.

    log_w: (G, K) unnormalised log-weights. Returns (G,) float64 in [1, K]; invariant to adding
    a per-group constant.
    """
    lw = _check_log_w(log_w)
    lw = lw - lw.max(1, keepdim=True).values  # (G, K), max 0: no overflow
    ess = torch.exp(2 * lw.logsumexp(1) - (2 * lw).logsumexp(1))  # (G,)
    ess = ess.clamp(1.0, float(lw.shape[1]))
    return torch.where((lw == 0).all(1), torch.full_like(ess, float(lw.shape[1])), ess)  # exact K when uniform


def _as_generators(generator, G: int) -> list:
    if isinstance(generator, torch.Generator) or generator is None:
        return [generator] * G
    gens = list(generator)
    if len(gens) != G:
        raise ValueError(f"generator must be one torch.Generator or a list of one per group (G={G}), got {len(gens)}")
    return gens


def _cdf(w_bar: torch.Tensor) -> torch.Tensor:
    """Cumulative weights along the last dim with the last bin forced to 1 (round-off could otherwise yield index K)."""
    c = torch.cumsum(w_bar, -1)
    c[..., -1] = 1.0
    return c


def _invert(cdf: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Smallest k with cdf[..., k] > point (points in [0, 1)); zero-weight particles are never hit."""
    return torch.searchsorted(cdf.contiguous(), points.contiguous(), right=True).clamp(max=cdf.shape[-1] - 1)


def _uniforms(gens: list, n: int) -> torch.Tensor:
    """(G, n) float64 U(0, 1) on the CPU, row g from gens[g], each drawn on its generator's own
    device (CPU or CUDA) and then moved, so ``torch.Generator("cuda")`` is accepted."""
    rows = [torch.rand(n, generator=g, dtype=torch.float64, device=g.device if g is not None else "cpu").cpu() for g in gens]
    return torch.stack(rows)


def resample_indices(log_w: torch.Tensor, scheme: str = "systematic", generator=None) -> torch.Tensor:
    """Ancestor indices (G, K) int64, each in [0, K) *within its group*.

    systematic: one U ~ U(0,1) per group, points (U + j)/K (uniform weights give the identity);
    stratified: points (U_j + j)/K, independent U_j; multinomial: K iid draws from w_bar (sorted);
    residual: floor(K w_bar) deterministic copies, the rest multinomial on the residual weights.
    generator: one torch.Generator (CPU or CUDA) shared by all groups, or a list of one per group.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    w_bar = normalized_weights(log_w).cpu()  # (G, K) float64
    G, K = w_bar.shape
    gens = _as_generators(generator, G)
    j = torch.arange(K, dtype=torch.float64)  # (K,)
    if scheme == "systematic":
        out = _invert(_cdf(w_bar), (_uniforms(gens, 1) + j) / K)
    elif scheme == "stratified":
        out = _invert(_cdf(w_bar), (_uniforms(gens, K) + j) / K)
    elif scheme == "multinomial":
        out = _invert(_cdf(w_bar), _uniforms(gens, K)).sort(-1).values
    else:  # residual
        copies = torch.floor(K * w_bar)  # (G, K)
        n_det = copies.sum(-1, keepdim=True)  # (G, 1)
        det = _invert(_cdf(copies / K), (j + 0.5).expand(G, K) / K)  # slot j -> owner of copy j
        resid = (K * w_bar - copies).clamp(min=0)
        resid = resid / resid.sum(-1, keepdim=True).clamp(min=1e-300)
        extra = _invert(_cdf(resid), _uniforms(gens, K))  # (G, K); only slots j >= n_det are used
        out = torch.where(j < n_det, det, extra).sort(-1).values
    return out.to(log_w.device)


def flat_indices(local: torch.Tensor) -> torch.Tensor:
    """(G, K) within-group ancestors -> (G*K,) rows of the flat group-major batch."""
    G, K = local.shape
    offsets = torch.arange(G, device=local.device)[:, None] * K  # (G, 1)
    return (local + offsets).reshape(-1)


def resample(
    tensors: Sequence[torch.Tensor],
    log_w: torch.Tensor,
    scheme: str = "systematic",
    generator=None,
    mask: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Resample flat group-major tensors (each (G*K, ...)) within groups.

    mask: optional (G,) bool, the groups to resample (others keep particles and log-weights).
    Returns (resampled tensors, new log_w (G, K) float64 (zeros where resampled), ancestors (G, K)).
    Groups whose log-weights are all equal keep their particles in place (no draw is consumed),
    which makes equal-weight runs identical to unweighted sampling (docs/fkc.md "Design choices").
    """
    lw = _check_log_w(log_w)
    G, K = lw.shape
    for t in tensors:
        if t.shape[0] != G * K:
            raise ValueError(f"tensors to resample must have G*K = {G * K} rows, got {t.shape[0]}")
    gens = _as_generators(generator, G)
    local = torch.arange(K, device=log_w.device).expand(G, K).clone()
    flat_eq = (lw == lw[:, :1]).all(1)  # (G,) groups with uniform weights
    chosen = torch.ones(G, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).cpu().reshape(-1)
    if chosen.numel() != G:
        raise ValueError(f"mask must have one entry per group (G={G}), got {chosen.numel()}")
    todo = (chosen & ~flat_eq.cpu()).nonzero().flatten().tolist()
    if todo:
        sub = resample_indices(lw[todo], scheme, [gens[g] for g in todo])
        local[todo] = sub.to(local.device)
    rows = flat_indices(local)
    out = [t[rows.to(t.device)] for t in tensors]
    new_lw = lw.clone()
    new_lw[chosen.to(lw.device)] = 0.0
    return out, new_lw, local


def draw_one_per_group(log_w: torch.Tensor, generator=None) -> torch.Tensor:
    """One particle index per group drawn from w_bar (G,) int64, one uniform per group."""
    w_bar = normalized_weights(log_w).cpu()  # (G, K)
    gens = _as_generators(generator, w_bar.shape[0])
    return _invert(_cdf(w_bar), _uniforms(gens, 1))[:, 0].to(log_w.device)
