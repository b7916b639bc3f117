"""Exact Markov-chain language: the oracle for masked discrete diffusion (docs/first_hitting.md).

A chain over V tokens with initial law pi (V,) and transition matrix P (V, V), sequences of
length L. Its exact denoiser mu*(x)[i, v] = p(x_i = v | unmasked tokens of x) comes from
forward-backward (Rabiner 1989, eqs. 18-27) with the "observations" e_j(v) = 1[v = x_j] at
unmasked positions and 1 at masked ones. It does not depend on time (Zheng et al. 2024, sec. 3),
so the same network serves every schedule.

JSON file (``--model markov:FILE.json``): {"initial": [V], "transition": [[V x V]], "length": L}.
Tokens decode as space-separated integers; the mask id is V.
"""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..core.categorical import inverse_cdf


class MarkovChain:
    """A first-order Markov chain language. All probability math in float64.

    smoothing lambda: the chain moves by (1 - lambda) P + lambda / V (every sequence possible) while
    forward-backward keeps using the sparse P plus a rank-one term (cheap for big banded chains).
    """

    def __init__(self, initial, transition, length: int, smoothing: float = 0.0):
        pi = torch.as_tensor(initial, dtype=torch.float64)
        P = torch.as_tensor(transition, dtype=torch.float64)
        if pi.ndim != 1 or pi.numel() < 2:
            raise ValueError(f"initial must be a vector of >= 2 probabilities, got shape {tuple(pi.shape)}")
        V = pi.numel()
        if P.shape != (V, V):
            raise ValueError(f"transition must have shape ({V}, {V}) to match initial, got {tuple(P.shape)}")
        for name, t in (("initial", pi), ("transition", P)):
            if not torch.isfinite(t).all() or (t < 0).any():
                raise ValueError(f"{name} must hold finite non-negative probabilities")
        if abs(float(pi.sum()) - 1) > 1e-6 or ((P.sum(1) - 1).abs() > 1e-6).any():
            raise ValueError("initial and every row of transition must sum to 1 (within 1e-6)")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.initial = pi / pi.sum()
        raw = P / P.sum(1, keepdim=True)
        self.smoothing = float(smoothing)
        self.transition = (1 - self.smoothing) * raw + self.smoothing / V
        self.length = length
        # sparse copy of the raw P (and P^T) for long sequences over big vocabularies
        density = float((raw > 0).double().mean())
        sparse = V >= 256 and density < 0.05
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self._PT_sparse = raw.t().contiguous().to_sparse_csr() if sparse else None
            self._P_sparse = raw.contiguous().to_sparse_csr() if sparse else None

    @property
    def vocab_size(self) -> int:
        return self.initial.numel()

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path) -> "MarkovChain":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read Markov chain file {path}: {err}") from err
        missing = [k for k in ("initial", "transition", "length") if k not in data]
        if missing:
            raise ValueError(f"Markov chain file {path} lacks keys {missing}; needs initial, transition, length")
        return cls(data["initial"], data["transition"], int(data["length"]))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"initial": self.initial.tolist(), "transition": self.transition.tolist(),
                                          "length": self.length}))

    # -- exact law ---------------------------------------------------------------------------
    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(x) for tokens (B, L') int64 (any L' >= 1). Returns (B,) float64."""
        x = torch.as_tensor(tokens, dtype=torch.long)
        if x.ndim != 2 or ((x < 0) | (x >= self.vocab_size)).any():
            raise ValueError(f"tokens must be (B, L) ids in [0, {self.vocab_size}), got shape {tuple(x.shape)}")
        lp = torch.log(self.initial)[x[:, 0]]
        if x.shape[1] > 1:
            lp = lp + torch.log(self.transition)[x[:, :-1], x[:, 1:]].sum(1)
        return lp

    def enumerate(self, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All V^L sequences (N, L) int64 in lexicographic order and their probabilities (N,) float64."""
        L = self.length if length is None else length
        if self.vocab_size**L > 2_000_000:
            raise ValueError(f"refusing to enumerate {self.vocab_size}^{L} sequences")
        seqs = torch.tensor(list(itertools.product(range(self.vocab_size), repeat=L)), dtype=torch.long)
        return seqs, self.log_prob(seqs).exp()

    def index_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Lexicographic index of each sequence (matches ``enumerate``). tokens: (B, L) -> (B,) int64."""
        x = torch.as_tensor(tokens, dtype=torch.long)
        powers = self.vocab_size ** torch.arange(x.shape[1] - 1, -1, -1)
        return (x * powers).sum(1)

    def marginal(self, i: int) -> torch.Tensor:
        """p(x_i = .) as (V,) float64."""
        p = self.initial.clone()
        for _ in range(i):
            p = p @ self.transition
        return p

    def sample(self, n: int, generator: torch.Generator, length: int | None = None) -> torch.Tensor:
        """n exact sequences (n, L) int64 by ancestral sampling (float64 inverse CDF)."""
        L = self.length if length is None else length
        out = torch.empty(n, L, dtype=torch.long)
        out[:, 0] = inverse_cdf(self.initial.double().log().expand(n, -1), generator)
        for j in range(1, L):
            out[:, j] = inverse_cdf(self.transition.double()[out[:, j - 1]].log(), generator)
        return out

    # -- exact denoiser ----------------------------------------------------------------------
    def _step_forward(self, f: torch.Tensor) -> torch.Tensor:  # f P_eff, f: (B, V)
        if self._PT_sparse is not None:
            lam = self.smoothing
            return (1 - lam) * torch.sparse.mm(self._PT_sparse, f.t()).t() + lam * f.sum(1, keepdim=True) / self.vocab_size
        return f @ self.transition

    def _step_backward(self, b: torch.Tensor) -> torch.Tensor:  # P_eff b, b: (B, V)
        if self._P_sparse is not None:
            lam = self.smoothing
            return (1 - lam) * torch.sparse.mm(self._P_sparse, b.t()).t() + lam * b.sum(1, keepdim=True) / self.vocab_size
        return b @ self.transition.t()

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """mu*(x)[b, i, v] = p(x_i = v | unmasked tokens of row b), (B, L, V) float64.

        x: (B, L) int64 with the mask id ``V`` at masked positions. Unmasked positions come back
        one-hot. A row whose unmasked tokens have probability 0 gives NaN (no conditional exists).
        """
        x = torch.as_tensor(x, dtype=torch.long)
        B, L = x.shape
        V = self.vocab_size
        if ((x < 0) | (x > V)).any():
            raise ValueError(f"tokens must be ids in [0, {V}] ({V} = mask)")
        P0 = self.initial.to(x.device)
        if self._PT_sparse is None and self.transition.device != x.device:
            self.transition = self.transition.to(x.device)
        masked = x == V
        evid = torch.ones(B, L, V, dtype=torch.float64, device=x.device)  # e_j(v)
        obs = ~masked
        evid[obs] = 0.0
        evid[obs, x[obs]] = 1.0
        fwd = torch.empty(B, L, V, dtype=torch.float64, device=x.device)
        f = P0 * evid[:, 0]
        f = f / f.sum(1, keepdim=True)
        fwd[:, 0] = f
        for j in range(1, L):
            f = self._step_forward(f) * evid[:, j]
            f = f / f.sum(1, keepdim=True)  # scaling (Rabiner eq. 91); 0/0 -> NaN on impossible rows
            fwd[:, j] = f
        post = torch.empty_like(fwd)
        b = torch.ones(B, V, dtype=torch.float64, device=x.device)
        post[:, L - 1] = fwd[:, L - 1]
        for j in range(L - 2, -1, -1):
            b = self._step_backward(b * evid[:, j + 1])
            b = b / b.amax(1, keepdim=True)
            post[:, j] = fwd[:, j] * b
        return post / post.sum(-1, keepdim=True)


class MarkovDenoiser(nn.Module):
    """The exact time-agnostic denoiser as a masked-diffusion network: log mu*(x), (B, L, V) float64."""

    def __init__(self, chain: MarkovChain):
        super().__init__()
        self.chain = chain

    def forward(self, input_ids: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        return torch.log(self.chain.posterior(input_ids))


class MarkovTokenizer:
    """Tokens as space-separated integers (``"0 2 1"``)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(s) for s in text.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"a Markov-chain prompt is space-separated token ids, got {text!r}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size - 1}], got {bad}")
        return ids

    def decode(self, ids) -> str:
        return " ".join("_" if int(i) >= self.vocab_size else str(int(i)) for i in ids)


def markov_model(name: str, chain: MarkovChain):
    from .masked_lm import masked_lm_model

    return masked_lm_model(name, MarkovDenoiser(chain), mask_token_id=chain.mask_token_id, length=chain.length,
                           tokenizer=MarkovTokenizer(chain.vocab_size), chain=chain, max_length=None)


def load_markov_file(path: str):
    """``--model markov:FILE.json`` loader (registered in gensample.zoo.text)."""
    return markov_model(f"markov:{path}", MarkovChain.from_json(path))


# docs/first_hitting.md: K = 3, L = 4; entropy 2.7632 nats, P(all four equal) = .512.
TOY_CHAIN = {
    "initial": [0.6, 0.3, 0.1],
    "transition": [[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]],
    "length": 4,
}


def toy_chain() -> MarkovChain:
    return MarkovChain(**TOY_CHAIN)


def banded_chain(vocab_size: int, length: int, band: int = 8, seed: int = 0, smoothing: float = 0.01) -> MarkovChain:
    """A long random chain for benchmarks: token v moves to one of v+1..v+band (mod V) with
    Dirichlet(1) probabilities, mixed with a uniform jump (``smoothing``) so that every sequence is
    possible; uniform initial law. Sparse plus rank one, so forward-backward stays cheap."""
    g = torch.Generator().manual_seed(seed)
    P = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
    w = -torch.log(torch.rand(vocab_size, band, generator=g, dtype=torch.float64))  # Exp(1) -> Dirichlet(1)
    w = w / w.sum(1, keepdim=True)
    cols = (torch.arange(vocab_size)[:, None] + torch.arange(1, band + 1)[None]) % vocab_size
    P.scatter_(1, cols, w)
    return MarkovChain(torch.full((vocab_size,), 1.0 / vocab_size, dtype=torch.float64), P, length, smoothing=smoothing)
