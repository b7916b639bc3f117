"""Semi-autoregressive block unmasking for masked-diffusion LMs: first-hitting and the confidence strategies.

Papers:
- Zheng, Chen, Mao, Liu, Zhu, Zhang, "Masked Diffusion Models are Secretly Time-Agnostic Masked Models and
  Exploit Inaccurate Categorical Sampling", ICLR 2025, arXiv 2409.02908: the first-hitting sampler (sec. 4.1:
  the next reveal time tau = alpha^-1(1 - (1 - alpha_t) u^(1/n)), one uniformly chosen masked position per
  reveal) and the float32 Gumbel truncation (sec. 4.2) that every draw here avoids (float64 inverse CDF).
- Nie et al., "Large Language Diffusion Models" (LLaDA), arXiv 2502.09992, its sampling procedure: semi-
  autoregressive blocks, an even split of the commits over the steps of a block, low-confidence and random
  remasking.
- Ye et al., "Dream 7B" (2025): margin (top-1 minus top-2 probability) and entropy confidences.
- Wu et al., "Fast-dLLM", arXiv 2505.22618: confidence-threshold parallel commits (and the prefix cache).
Notes: docs/masked_lms.md.

Code name -> symbol:
    x            (B, L) int64 tokens; ``mask_token_id`` is m
    window       the last ``gen_length`` positions of x; blocks are [start, start + block_length) in it
    editable     (B, L) bool, positions the sampler fills (default x == m); they start as m
    candidates   (B, W) bool, positions of the current block that are still masked and editable
    k            (B,) int64 commits of this step: ``commit_counts`` of the block's masks over its steps
    log_p        float64 log-probs of the law a token is drawn from: log_softmax(logits / T), top-k, top-p
    x0           the proposed token at a position (argmax when T = 0, else a float64 inverse-CDF draw)
    t            (B,) float64 first-hitting time of the block: 1 at the block start, tau after each step
Float64 is used only on the rows that are drawn: FHS and random gather the k chosen rows first; the confidence
strategies need a proposal at every candidate of the block (their rule ranks them all), chunked.

Nothing here imports diffusers or transformers; the diffusers face is ``gensample.schedulers.first_hitting_block``
and calls ``unmask_step`` / ``commit_counts`` / ``reveal_fraction`` exactly as ``sample_blocks`` does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..core import categorical as cat
from ..core.categorical import Generators
from .first_hitting import SCHEDULES, mask_alpha, mask_alpha_inv

REMASKING = ("fhs", "low-confidence", "margin", "entropy", "random")
CONFIDENCE_KINDS = ("low-confidence", "margin", "entropy")
RULES = ("topk", "union")
CHUNK_ENTRIES = 2**22  # float64 entries per chunk of proposal rows (32 MiB)


# -- 2. parameters ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockConfig:
    """Parameters of ``sample_blocks`` (docs/masked_lms.md).

    gen_length: positions generated (the last ``gen_length`` of x); block_length: semi-AR block size;
    steps: network calls budgeted PER BLOCK (the block's masks are split evenly over them);
    remasking: which positions a step commits (``REMASKING``); temperature / top_k / top_p: the law tokens are
    drawn from (temperature 0: argmax); threshold: Fast-dLLM parallel commits (confidence strategies only);
    mask_token_id: m (never drawn); eos_token_id / stop_at_eos: stop a row once an EOS follows only unmasked
    tokens; exclude_ids: never drawn; schedule: alpha_t of the first-hitting times (fhs only).
    """

    gen_length: int
    block_length: int
    steps: int
    remasking: str = "fhs"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    threshold: float | None = None
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    stop_at_eos: bool = False
    exclude_ids: tuple = ()
    schedule: str = "linear"

    def __post_init__(self):
        for name in ("gen_length", "block_length", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.threshold is not None:
            if not (isinstance(self.threshold, (int, float)) and self.threshold > 0):
                raise ValueError(f"threshold must be a number > 0 or None, got {self.threshold!r}")
            if self.remasking not in CONFIDENCE_KINDS:
                raise ValueError(f"threshold applies to remasking in {CONFIDENCE_KINDS}, got remasking={self.remasking!r}")
        if isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, int) or self.mask_token_id < 0:
            raise ValueError(f"mask_token_id must be an int >= 0, got {self.mask_token_id!r}")
        if self.stop_at_eos and self.eos_token_id is None:
            raise ValueError("stop_at_eos=True needs eos_token_id")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        object.__setattr__(self, "exclude_ids", tuple(int(i) for i in self.exclude_ids))


# -- 3. pure step functions ------------------------------------------------------------------------------------------
def commit_counts(n_masked, steps: int) -> torch.Tensor:
    """Commits per step when n masks are split evenly over ``steps`` (LLaDA's schedule): n // steps each, the first
    n % steps steps one more. n_masked: int or (B,) int64; returns (steps,) or (B, steps) int64."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    n = torch.as_tensor(n_masked, dtype=torch.long)
    if (n < 0).any():
        raise ValueError(f"n_masked must be >= 0, got {n_masked!r}")
    base, rem = n // steps, n % steps  # (...)
    j = torch.arange(steps, device=n.device)
    return base.unsqueeze(-1) + (j < rem.unsqueeze(-1)).long()  # (..., steps)


def confidence_scores(log_p: torch.Tensor, x0: torch.Tensor, kind: str) -> torch.Tensor:
    """Confidence of the proposal x0 under the float64 law log_p (higher = commit first).

    low-confidence: p(x0) (LLaDA); margin: p_(1) - p_(2), the two largest probabilities (Dream "topk_margin");
    entropy: sum_v p_v log p_v = -H (Dream "entropy"). log_p: (M, K) float64; x0: (M,) int64. Returns (M,) float64.
    """
    if kind == "low-confidence":
        return log_p.gather(-1, x0.unsqueeze(-1)).squeeze(-1).exp()
    if kind == "margin":
        top = log_p.topk(min(2, log_p.shape[-1]), dim=-1).values.exp()  # (M, 2)
        return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)
    if kind == "entropy":
        # p log p with 0 log 0 = 0: log p = -inf is clamped to the most negative double, so p = 0 gives (-)0
        # exactly as the masked form did, in fewer passes over the (M, K) rows
        return (log_p.exp() * log_p.clamp_min(torch.finfo(torch.float64).min)).sum(-1)
    raise ValueError(f"kind must be one of {CONFIDENCE_KINDS}, got {kind!r}")


def _check_rows(rows: torch.Tensor) -> None:
    """Raise if a row holds a NaN or no finite entry. One max-reduction over the (C, K) rows (it propagates NaN);
    only when some row's max is not finite (NaN, all -inf, or a +inf entry) does the entry-wise scan run."""
    top = rows.amax(-1)  # (C,)
    if bool(torch.isfinite(top).all()):
        return
    if not torch.isfinite(rows).any(-1).all() or torch.isnan(rows).any():
        raise ValueError("network logits contain NaN or no finite entry in a row being drawn")


def propose_tokens(logits: torch.Tensor, where: torch.Tensor, generator: Generators, *, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, exclude=(), kind: str | None = None,
                   chunk_entries: int = CHUNK_ENTRIES):
    """Propose x0 at the positions ``where`` and score it; float64 only on those rows, a chunk at a time.

    logits: (B, W, K) any float dtype; where: (B, W) bool. Temperature > 0: x0 ~ exp(log_p) by an exact float64
    inverse CDF (one uniform per row, from the row's generator); temperature 0: x0 = argmax of the logits (the
    ``exclude`` ids never chosen) and log_p = log_softmax(logits) untempered and unfiltered (what the stock
    scheduler reports). Returns x0 (B, W) int64 (-1 where not drawn), prob (B, W) float64 = p(x0) (0 where not
    drawn), score (B, W) float64 = ``confidence_scores(kind)`` (-inf where not drawn, or when kind is None).
    """
    B, W, K = logits.shape
    x0 = torch.full((B, W), -1, dtype=torch.long, device=logits.device)
    prob = torch.zeros((B, W), dtype=torch.float64, device=logits.device)
    score = torch.full((B, W), float("-inf"), dtype=torch.float64, device=logits.device)
    pos = where.nonzero()  # (M, 2), row-major
    if pos.shape[0] == 0:
        return x0, prob, score
    step = max(1, int(chunk_entries) // K)
    for g, members in cat.owner_groups(generator, pos[:, 0], pos.device):
        for s in range(0, members.numel(), step):
            p_b, p_w = pos[members[s:s + step]].unbind(1)
            rows = logits[p_b, p_w]  # (C, K) model dtype
            _check_rows(rows)
            if temperature == 0:
                log_p = cat.sampling_log_probs(rows, exclude=exclude)  # (C, K) float64
                tok = log_p.argmax(-1)
            else:
                log_p = cat.sampling_log_probs(rows, exclude=exclude, temperature=temperature, top_k=top_k, top_p=top_p)
                tok = cat.inverse_cdf(log_p, g)
            x0[p_b, p_w] = tok
            prob[p_b, p_w] = log_p.gather(-1, tok.unsqueeze(-1)).squeeze(-1).exp()
            if kind is not None:
                score[p_b, p_w] = confidence_scores(log_p, tok, kind)
            del log_p
    return x0, prob, score


def top_ranked(score: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, W) bool: the k_b highest scores of each row (-inf entries only if k_b exceeds the finite ones; callers
    clamp k to the candidates). score: (B, W) float64; k: (B,) int64. Ties go to the lower position (stable sort)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return ranks < k.unsqueeze(-1)


def choose_uniform(candidates: torch.Tensor, k: torch.Tensor, generator: Generators) -> torch.Tensor:
    """min(k_b, n_b) distinct candidate positions per row, uniformly at random (FHS step 3; LLaDA "random"):
    float64 uniform scores drawn on the generator's device, -inf off the candidates, the k_b largest.
    candidates: (B, W) bool; k: (B,) int64. Returns (B, W) bool."""
    u = cat.uniform(candidates.shape, generator, dtype=torch.float64).to(candidates.device)
    u = u.masked_fill(~candidates, float("-inf"))
    return top_ranked(u, torch.minimum(k, candidates.sum(1))) & candidates


class StepResult(NamedTuple):
    x: torch.Tensor          # (B, W) int64 tokens after the step
    commit: torch.Tensor     # (B, W) bool, candidates filled this step
    edit: torch.Tensor       # (B, W) bool, non-candidate positions replaced (editing)
    x0: torch.Tensor         # (B, W) int64 proposals (the current token where none was drawn)
    prob: torch.Tensor       # (B, W) float64 p(x0) under the law it was drawn from (0 where none was drawn)


def unmask_step(logits: torch.Tensor, x: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor,
                generator: Generators, *, remasking: str, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, threshold: float | None = None, exclude=(), rule: str = "topk",
                edit_candidates: torch.Tensor | None = None, editing_threshold: float | None = None) -> StepResult:
    """One step inside a block: choose which candidates to commit and draw their tokens.

    fhs / random: min(k_b, n_b) candidates uniformly (``choose_uniform``), then x0 drawn only there (FHS steps 3-4,
    paper sec. 4.1; with k = 1 and T = 1 this is exact first hitting). Confidence strategies: x0 proposed at every
    candidate (and at ``edit_candidates``), scored by ``confidence_scores``; rule "topk" (LLaDA / diffusers mask
    mode): if at least k_b candidates have p(x0) > threshold commit all of those (Fast-dLLM), else the k_b best
    scores; rule "union" (diffusers' uniform-corruption mode): the k_b best scores plus every p(x0) > threshold.
    Editing (confidence strategies): an edit candidate whose proposal differs with p(x0) > editing_threshold.

    logits: (B, W, K) for the W positions of x (B, W); candidates: (B, W) bool; k: (B,) int64.
    """
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    k = torch.as_tensor(k, dtype=torch.long, device=x.device).expand(x.shape[0])
    no_edit = torch.zeros_like(candidates)
    if remasking in ("fhs", "random"):
        commit = choose_uniform(candidates, k, generator)
        x0, prob, _ = propose_tokens(logits, commit, generator, temperature=temperature, top_k=top_k, top_p=top_p,
                                     exclude=exclude)
        edit = no_edit
    else:
        where = candidates if edit_candidates is None else candidates | edit_candidates
        x0, prob, score = propose_tokens(logits, where, generator, temperature=temperature, top_k=top_k,
                                         top_p=top_p, exclude=exclude, kind=remasking)
        score = score.masked_fill(~candidates, float("-inf"))
        best = top_ranked(score, torch.minimum(k, candidates.sum(1))) & candidates
        high = candidates & (prob > threshold) if threshold is not None else no_edit
        if rule == "union":
            commit = best | high
        else:
            enough = high.sum(1) >= k  # (B,)
            commit = torch.where(enough.unsqueeze(-1), high, best)
        edit = no_edit
        if edit_candidates is not None and editing_threshold is not None:
            edit = edit_candidates & ~candidates & (x0 != x) & (prob > float(editing_threshold))
    x0 = torch.where(x0 >= 0, x0, x)
    return StepResult(torch.where(commit | edit, x0, x), commit, edit, x0, prob)


def reveal_fraction(n: torch.Tensor, k: torch.Tensor, generator: Generators) -> torch.Tensor:
    """r = (1 - alpha_tau) / (1 - alpha_t) after revealing k_b of n_b masks (paper sec. 4.1): the k-th largest of
    n iid U(0, 1) masking-time fractions, Beta(n - k + 1, k) = S_{n-k+1} / S_{n+1}, S_j a sum of j Exp(1)
    (Renyi). k = 1 gives u^(1/n). n, k: (B,) int64 with k <= n; rows with k = 0 return 1. (B,) float64 on CPU.
    Each row draws n_b + 1 float64 uniforms (a list of generators: from its own generator)."""
    n, k = n.cpu().long(), k.cpu().long()
    B = n.shape[0]
    n_max = int(n.max()) if B else 0
    if isinstance(generator, torch.Generator):
        u = cat.uniform((B, n_max + 1), generator, dtype=torch.float64).cpu()
    else:
        u = torch.ones((B, n_max + 1), dtype=torch.float64)
        for b, g in enumerate(generator):
            u[b, : int(n[b]) + 1] = cat.uniform((int(n[b]) + 1,), g, dtype=torch.float64).cpu()
    S = torch.cumsum(-torch.log1p(-u), 1)  # (B, n_max + 1): S_1 .. S_{n_max + 1}
    total = S.gather(1, n.unsqueeze(1))[:, 0]  # S_{n+1}
    part = S.gather(1, (n - k).clamp_min(0).unsqueeze(1))[:, 0]  # S_{n-k+1}
    return torch.where(k > 0, part / total, torch.ones(B, dtype=torch.float64))


def next_block_time(t: torch.Tensor, n: torch.Tensor, k: torch.Tensor, generator: Generators,
                    schedule: str = "linear") -> torch.Tensor:
    """tau = alpha^-1(1 - (1 - alpha_t) r), r = ``reveal_fraction`` (paper sec. 4.1; linear: tau = t r). (B,) float64."""
    r = reveal_fraction(n, k, generator)
    t = t.double().cpu()
    return mask_alpha_inv(1.0 - (1.0 - mask_alpha(t, schedule)) * r, schedule)


# -- 4. the loop -----------------------------------------------------------------------------------------------------
def _accepts_block(network) -> bool:
    """Whether the network names a ``block`` parameter (an nn.Module: its ``forward``); ``**kwargs`` does not count."""
    target = network.forward if isinstance(network, torch.nn.Module) else network
    try:
        return "block" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _eos_finished(x: torch.Tensor, editable: torch.Tensor, mask_id: int, eos_id: int, start: int) -> torch.Tensor:
    """(B,) bool: the window holds an EOS and every editable position before the first one is unmasked."""
    win = x[:, start:]
    is_eos = win == eos_id
    first = torch.where(is_eos.any(1), is_eos.long().argmax(1), torch.full_like(is_eos[:, 0], win.shape[1], dtype=torch.long))
    before = torch.arange(win.shape[1], device=x.device).unsqueeze(0) < first.unsqueeze(1)
    open_before = (before & editable[:, start:] & (win == mask_id)).any(1)
    return is_eos.any(1) & ~open_before


def sample_blocks(network: Callable, x: torch.Tensor, cfg: BlockConfig, generator: Generators, *,
                  editable: torch.Tensor | None = None, on_step: Callable | None = None) -> tuple[torch.Tensor, dict]:
    """Semi-autoregressive block unmasking (LLaDA's sampler) with first-hitting or confidence commits.

    network(x (B, L)) -> logits (B, L, K) (or (B, end - start, K) when called with ``block=(start, end)``, which
    happens if it names that parameter: a model may then reuse a prefix cache; the block's logits must equal the
    uncached ones). x: (B, L) int64; the window is x[:, L - gen_length:], cut into blocks of ``block_length``
    processed left to right; ``editable`` (B, L) bool (default x == mask) marks what is generated, all inside the
    window; those positions start as the mask. Per block, its masks n_b are split over ``cfg.steps`` calls by
    ``commit_counts``; a step with no commit due in any row makes no call. fhs also tracks the block time t
    (1 -> 0, ``next_block_time``). ``on_step(info)`` gets dict(block, step, start, end, x, commit, t).
    Returns (tokens (B, L), stats {"nfe", "committed" (positions filled, all rows), "tokens_per_call", "blocks"}).
    """
    if not isinstance(cfg, BlockConfig):
        raise TypeError(f"cfg must be a BlockConfig, got {type(cfg).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.dtype != torch.long:
        raise ValueError(f"x must be an int64 tensor of shape (B, L), got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    B, L = x.shape
    if cfg.gen_length > L:
        raise ValueError(f"gen_length must be <= x.shape[1] = {L}, got {cfg.gen_length}")
    m = cfg.mask_token_id
    ws = L - cfg.gen_length
    editable = (x == m) if editable is None else editable.to(device=x.device, dtype=torch.bool)
    if editable.shape != x.shape:
        raise ValueError(f"editable must have the shape of x {tuple(x.shape)}, got {tuple(editable.shape)}")
    if editable[:, :ws].any():
        raise ValueError(f"editable positions must lie in the window x[:, {ws}:] (gen_length={cfg.gen_length})")
    x = torch.where(editable, torch.full_like(x, m), x)
    exclude = (m, *cfg.exclude_ids)
    cached = _accepts_block(network)
    finished = torch.zeros(B, dtype=torch.bool, device=x.device)
    fhs = cfg.remasking == "fhs"
    nfe, committed_total, n_blocks = 0, 0, 0
    for j, start in enumerate(range(ws, L, cfg.block_length)):
        end = min(start + cfg.block_length, L)
        n_blocks += 1
        open_ = editable[:, start:end] & (x[:, start:end] == m)  # (B, W)
        counts = commit_counts(open_.sum(1), cfg.steps)  # (B, steps)
        t = torch.ones(B, dtype=torch.float64)
        for i in range(cfg.steps):
            cand = editable[:, start:end] & (x[:, start:end] == m) & ~finished.unsqueeze(1)
            n = cand.sum(1)
            k = torch.minimum(counts[:, i], n)
            if not bool((k > 0).any()):
                continue
            out = network(x, block=(start, end)) if cached else network(x)
            logits = getattr(out, "logits", out)
            if logits.ndim != 3 or logits.shape[0] != B or logits.shape[1] not in (L, end - start):
                raise ValueError(f"network must return logits (B, L, K) or (B, block, K), got {tuple(logits.shape)}")
            blk = logits[:, start:end] if logits.shape[1] == L else logits
            nfe += 1
            res = unmask_step(blk, x[:, start:end], cand, k, generator, remasking=cfg.remasking,
                              temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, threshold=cfg.threshold,
                              exclude=exclude)
            x[:, start:end] = res.x
            got = res.commit.sum(1)
            committed_total += int(got.sum())
            if fhs:
                t = torch.where(got.cpu() > 0, next_block_time(t, n, got, generator, cfg.schedule), t)
            if cfg.stop_at_eos:
                finished |= _eos_finished(x, editable, m, cfg.eos_token_id, ws)
            if on_step is not None:
                on_step({"block": j, "step": i, "start": start, "end": end, "x": x, "commit": res.commit, "t": t})
        if cfg.stop_at_eos and bool(finished.all()):
            break
    if cfg.stop_at_eos:  # rows that stopped: what is still masked after their EOS becomes EOS
        rest = editable & (x == m) & finished.unsqueeze(1)
        x = torch.where(rest, torch.full_like(x, cfg.eos_token_id), x)
    stats = {"nfe": nfe, "committed": committed_total, "tokens_per_call": committed_total / (B * nfe) if nfe else 0.0,
             "blocks": n_blocks}
    return x, stats
