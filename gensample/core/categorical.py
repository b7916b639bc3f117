"""Float64-safe categorical and Gumbel-max draws (docs/first_hitting.md).

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
                   E = 1e-10 - log(u + 1e-10) (a study knob); b = 24 reproduces the float32
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


def _generator_device(generator: Generators) -> torch.device:
    g = generator if isinstance(generator, torch.Generator) else next(iter(generator), None)
    return torch.device("cpu") if g is None else g.device


def uniform(shape: Sequence[int], generator: Generators, *, dtype: torch.dtype = torch.float64,
            device: torch.device | str | None = None) -> torch.Tensor:
    """U[0, 1) of the given shape, drawn on the generator's device, then moved to ``device``.

    With a list of generators, ``shape[0]`` must equal its length and row b comes from generator b.
    A CUDA generator therefore draws on the GPU (no host-side noise and copy); a CPU generator
    draws on the CPU (the same numbers whatever the model's device).
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, torch.Generator):
        u = torch.rand(shape, generator=generator, dtype=dtype, device=generator.device)
    else:
        gens = list(generator)
        if not shape or shape[0] != len(gens):
            raise ValueError(f"got {len(gens)} generators for a draw of shape {shape}; need one per row")
        if not gens:
            u = torch.empty(shape, dtype=dtype)
        else:
            u = torch.stack([torch.rand(shape[1:], generator=g, dtype=dtype, device=g.device).to(gens[0].device)
                             for g in gens])
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
    return u.log_().neg_()  # -log u, in place (u is a fresh draw)


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
    E.log_()
    return (log_w.double() - E).argmax(-1)  # log w - log E: Gumbel-max


def inverse_cdf(log_w: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Exact float64 inverse-CDF draw: one uniform per row instead of K (an exact alternative to Gumbel-max).

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

    logits: (..., K) any float dtype (upcast to float64 *before* the softmax). Ids >= K are
    ignored (a network that does not score the mask needs no exclusion).
    """
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    lw = logits.double()  # a fresh float64 copy (also for float64 input: it is modified in place below)
    if lw.data_ptr() == logits.data_ptr():
        lw = lw.clone()
    if temperature != 1.0:
        lw /= float(temperature)
    K = lw.shape[-1]
    ids = [int(i) for i in exclude if 0 <= int(i) < K]
    if ids:
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


def owner_groups(generator: Generators, owner: torch.Tensor, device) -> list[tuple[torch.Generator, torch.Tensor]]:
    """(generator, member indices on ``device``) pairs for rows whose batch row is ``owner`` (M,) int64: one group
    of all M rows for a single generator; for a list, one group per distinct owner b (ascending), drawing from
    ``generator[b]``, its members in their given order."""
    if isinstance(generator, torch.Generator):
        return [(generator, torch.arange(owner.numel(), device=device))]
    gens = list(generator)
    owner_cpu = owner.cpu()
    return [(gens[int(b)], (owner_cpu == b).nonzero()[:, 0].to(device)) for b in torch.unique(owner_cpu)]


# Float64 working set of one chunk in ``sample_rows``: at least 2^20 entries (8 MiB per float64 copy),
# at most 1/32 of the selected rows, so the extra memory stays below ~0.3 x the float32 rows.
CHUNK_MIN_ENTRIES = 2**20
CHUNK_FRACTION = 32


def sample_rows(logits: torch.Tensor, owner: torch.Tensor, generator: Generators, *, rows: torch.Tensor | None = None,
                exclude: Sequence[int] = (), temperature: float = 1.0, shift: float = 0.0,
                extra_log_w: float | None = None, precision: str = "float64", uniform_bits: int | None = None,
                chunk_entries: int | None = None) -> torch.Tensor:
    """Gumbel-max draws for M selected rows of logits, upcasting only a bounded chunk at a time.

    logits: (R, K) in the model's dtype; ``rows`` (M,) int64 picks the rows to sample (default: all
    R rows, M = R); they are gathered chunk by chunk, so no (M, K) copy is made.
    owner: (M,) int64 batch row of each sampled row; with a list of generators, row m draws from
    ``generator[owner[m]]`` (rows of one owner in their given order), so a sample does not depend
    on the other samples of its batch. Each row's weights are log mu = log_softmax(logits / T) with
    ``exclude`` ids at -inf (float64), plus ``shift``; ``extra_log_w`` (if given) appends one more
    category with that log-weight (the "stay masked" weight of an ancestral step), whose index is K.
    Returns (M,) int64 in [0, K] (K only when ``extra_log_w`` is given).

    Peak extra memory is O(chunk) float64 (default chunk: max(2^20, M (K + 1) / 32) entries); the
    law is exact per row (Gumbel-max on float64 weights; float32/uniform_bits emulate MDLM's sampler).
    """
    _check_precision(precision, uniform_bits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (R, K), got {tuple(logits.shape)}")
    rows = torch.arange(logits.shape[0], device=logits.device) if rows is None else rows
    if owner.shape != rows.shape:
        raise ValueError(f"owner must have one entry per sampled row, got {tuple(owner.shape)} for {tuple(rows.shape)}")
    M, K = rows.shape[0], logits.shape[1]
    out = torch.empty(M, dtype=torch.long, device=logits.device)
    if M == 0:
        return out
    width = K + (extra_log_w is not None)
    if chunk_entries is None:
        chunk_entries = max(CHUNK_MIN_ENTRIES, M * width // CHUNK_FRACTION)
    step = max(1, int(chunk_entries) // width)
    for g, members in owner_groups(generator, owner, logits.device):
        for start in range(0, members.numel(), step):
            sel = members[start:start + step]
            log_w = masked_log_softmax(logits[rows[sel]], exclude, temperature)  # (C, K) float64
            if shift:
                log_w += shift
            if extra_log_w is not None:
                col = torch.full((sel.numel(), 1), float(extra_log_w), dtype=torch.float64, device=log_w.device)
                log_w = torch.cat([log_w, col], 1)  # (C, K + 1)
            out[sel] = gumbel_argmax(log_w, g, precision=precision, uniform_bits=uniform_bits)
            del log_w
    return out


def masked_argmax(logits: torch.Tensor, exclude: Sequence[int] = ()) -> torch.Tensor:
    """argmax over the last axis with the ``exclude`` ids never chosen; no float64 copy. (...,) int64."""
    K = logits.shape[-1]
    ids = [int(i) for i in exclude if 0 <= int(i) < K]
    if not ids:
        return logits.argmax(-1)
    lw = logits.clone()
    lw[..., ids] = float("-inf")
    return lw.argmax(-1)


def filter_top_k_top_p(log_p: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Restrict float64 log-probs to the top-k tokens, then to the top-p nucleus, and renormalise.

    log_p: (..., K) float64 normalised log-probabilities (-inf = excluded). top-k keeps every token whose
    log-prob is >= the k-th largest (ties kept); top-p keeps token i (in descending order) while the mass of the
    tokens before it, under the top-k law renormalised, is <= top_p (so the most likely token always stays): the rule of diffusers'
    BlockRefinementScheduler and of Holtzman et al. 2020 (nucleus sampling, sec. 3.1). ``None``, top_k <= 0 or
    top_k >= K, and top_p >= 1 are no-ops. Returns a new (..., K) float64 tensor, renormalised.
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise TypeError(f"top_k must be an int or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    out = log_p.double()
    K = out.shape[-1]
    changed = False
    if top_k is not None and 0 < top_k < K:
        kth = out.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        out = torch.log_softmax(out.masked_fill(out < kth, float("-inf")), -1)  # top-p acts on the top-k law
        changed = True
    if top_p is not None and top_p < 1.0:
        srt, idx = out.sort(-1, descending=True)  # (..., K)
        p_srt = srt.exp()
        before = torch.cumsum(p_srt, -1) - p_srt  # mass strictly before each sorted token
        drop_sorted = before > float(top_p)
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
        changed = True
    return torch.log_softmax(out, -1) if changed else out


def sampling_log_probs(logits: torch.Tensor, *, exclude: Sequence[int] = (), temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """float64 log-probs of the law a token is drawn from: log_softmax(logits / T) (``exclude`` at -inf), then
    top-k, then top-p (``filter_top_k_top_p``). Upcasts before the softmax; pass only the rows you draw.
    logits: (..., K) any float dtype. Returns (..., K) float64."""
    return filter_top_k_top_p(masked_log_softmax(logits, exclude, temperature), top_k, top_p)
