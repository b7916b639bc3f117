"""Exact-match accuracy of a masked-diffusion LM on a task with checkable answers (docs/masked_lms.md).

The embedded model ``mdm-add`` fills the answer of ``"a+b="`` (``gensample.train.task_mdm``).
For a sampler configuration we draw ``n`` problems from a fixed seed, let the sampler fill the
answer positions, and count the rows whose answer equals ``a + b`` exactly. ``correct`` out of
``n`` is a binomial count, so the report carries the accuracy ``p_hat = correct / n``, its
standard error ``sqrt(p_hat (1 - p_hat) / n)`` and the 95 % Wilson score interval (which stays
inside [0, 1] and is not degenerate at ``p_hat`` = 0 or 1).

NFE is counted per sequence: a wrapper around the network counts, for every row, the calls made
while that row still had a masked position in the block being decoded (the sampler passes
``block=(start, end)`` to a network that accepts it). A batch-wide call on which a row had
nothing left to fill does not count for that row, so the number does not depend on which other
problems shared the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..samplers.block_unmasking import BlockConfig, _accepts_block, sample_blocks
from ..samplers.first_hitting import MaskedDiffusionConfig, sample_first_hitting
from ..train.task_mdm import AdditionTask


def task_of(model) -> AdditionTask:
    """The ``AdditionTask`` a loaded task model was trained on (``extras["task"]``)."""
    info = model.extras.get("task")
    if not isinstance(info, dict) or info.get("name") != "addition":
        raise ValueError(f"model {model.name!r} carries no addition task (extras['task']); use --model mdm-add")
    return AdditionTask(int(info["digits"]))


def carry_chain(task: AdditionTask, ab: torch.Tensor) -> torch.Tensor:
    """(n,) int64: the longest carry chain of ``a + b``: a digit position that generates a carry
    (a_j + b_j >= 10) followed by the run of higher positions that pass it on (a_j + b_j = 9); 0 when
    no position generates one. The answer digit at the top of a chain of length c depends on the c
    digit pairs below it, which a one-call (fully parallel) decode must resolve in one forward pass."""
    powers = 10 ** torch.arange(task.digits, dtype=torch.long)  # least significant first
    pair = (ab[:, :1] // powers) % 10 + (ab[:, 1:] // powers) % 10  # (n, D)
    run = torch.zeros(ab.shape[0], dtype=torch.long)
    best = torch.zeros_like(run)
    for j in range(task.digits):
        passes_on = (pair[:, j] == 9) & (run > 0)
        run = torch.where(pair[:, j] >= 10, torch.ones_like(run), torch.where(passes_on, run + 1, torch.zeros_like(run)))
        best = torch.maximum(best, run)
    return best


def addition_problems(task: AdditionTask, n: int, seed: int, mask_token_id: int,
                      min_carry_chain: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` problems from ``seed``: operands (n, 2) int64 and the sampler's start x (n, L), answer masked.

    ``min_carry_chain`` > 0 keeps only problems whose ``carry_chain`` is at least that long (uniform draws,
    rejection in rounds from the same generator), the hard cases for parallel decoding.
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not (isinstance(min_carry_chain, int) and 0 <= min_carry_chain <= task.digits):
        raise ValueError(f"min_carry_chain must be an int in [0, {task.digits}], got {min_carry_chain!r}")
    gen = torch.Generator().manual_seed(int(seed))
    if min_carry_chain == 0:
        ab = task.operands(n, gen)  # (n, 2)
    else:
        kept, have = [], 0
        while have < n:
            cand = task.operands(max(4096, 64 * n), gen)
            cand = cand[carry_chain(task, cand) >= min_carry_chain]
            kept.append(cand)
            have += cand.shape[0]
        ab = torch.cat(kept)[:n]
    x = task.token_rows(ab)  # (n, L)
    x[:, task.prompt_length:] = int(mask_token_id)
    return ab, x


def check_answers(task: AdditionTask, ab: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the answer positions of ``tokens`` (n, L) spell ``a + b`` exactly (prompt must be intact too)."""
    target = task.token_rows(ab.to("cpu"))
    return (tokens.to("cpu") == target).all(1)


@dataclass(frozen=True)
class BinomialEstimate:
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def stderr(self) -> float:
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.n)

    def wilson(self, z: float = 1.959963984540054) -> tuple[float, float]:
        """Wilson score interval (default 95 %)."""
        n, p = self.n, self.accuracy
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def as_dict(self) -> dict:
        lo, hi = self.wilson()
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy, "stderr": self.stderr,
                "wilson95": [lo, hi]}


class CallCounter:
    """Wrap ``network(x) -> logits``; count per-row calls made while the row had a mask in the block.

    Forwards ``block=`` when the wrapped network accepts it. ``per_row`` (B,) int64 after sampling.
    """

    def __init__(self, network, batch: int, mask_token_id: int):
        self.network = network
        self.mask_token_id = int(mask_token_id)
        self.per_row = torch.zeros(batch, dtype=torch.long)
        self.calls = 0
        self.forward_block = _accepts_block(network)

    def __call__(self, x: torch.Tensor, block: tuple[int, int] | None = None, **kwargs):
        if x.shape[0] != self.per_row.numel():
            raise ValueError(f"the sampler called the network on {x.shape[0]} rows, not the batch of "
                             f"{self.per_row.numel()}: per-row NFE cannot be attributed")
        window = x if block is None else x[:, block[0]:block[1]]
        self.per_row += (window == self.mask_token_id).any(1).to("cpu", torch.long)
        self.calls += 1
        if block is not None and self.forward_block:
            kwargs["block"] = block
        return self.network(x, **kwargs)


def _blocks_config(task: AdditionTask, mask_token_id: int, exclude_ids: tuple, params: dict):
    return BlockConfig(gen_length=task.answer_length, mask_token_id=int(mask_token_id),
                       exclude_ids=tuple(exclude_ids), **params)


def measure(model, params: dict, *, n: int, seed: int, batch_size: int = 1000, sampler: str = "blocks",
            min_carry_chain: int = 0) -> dict:
    """Accuracy and per-sequence NFE of one sampler configuration on ``n`` problems from ``seed``.

    ``sampler="blocks"``: ``gensample.samplers.block_unmasking.sample_blocks`` with
    ``BlockConfig(gen_length=answer length, **params)`` (keys: block_length, steps, remasking,
    temperature, threshold, ...). ``sampler="fhs"``: the first-hitting sampler with ``params`` as
    ``MaskedDiffusionConfig`` fields (e.g. tokens_per_step, temperature). The problems depend on
    ``seed`` (and ``min_carry_chain``, see ``addition_problems``) only; the sampler's generator is seeded
    from ``seed`` and the batch index.
    """
    if sampler not in ("blocks", "fhs"):
        raise ValueError(f"sampler must be 'blocks' or 'fhs', got {sampler!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    task = task_of(model)
    mask_id = int(model.extras["mask_token_id"])
    exclude = tuple(model.extras.get("exclude_ids", ()))
    network = model.extras["network"]
    ab, x_all = addition_problems(task, n, seed, mask_id, min_carry_chain)
    correct, nfe_rows, calls = 0, [], 0
    for i, start in enumerate(range(0, n, batch_size)):
        x = x_all[start:start + batch_size]  # CPU, like the embedded model
        gen = torch.Generator().manual_seed(int(seed) + 1_000_003 * (i + 1))
        counter = CallCounter(network, x.shape[0], mask_id)
        with torch.no_grad():
            if sampler == "blocks":
                out, _ = sample_blocks(counter, x, _blocks_config(task, mask_id, exclude, params), gen)
            else:
                cfg = MaskedDiffusionConfig(mask_token_id=mask_id, exclude_ids=exclude, **params)
                out, _ = sample_first_hitting(lambda x_t, t: counter(x_t), x, cfg, gen)
        correct += int(check_answers(task, ab[start:start + batch_size], out).sum())
        nfe_rows.append(counter.per_row)
        calls += counter.calls
    nfe = torch.cat(nfe_rows).double()
    return {**BinomialEstimate(correct, n).as_dict(), "nfe_mean": float(nfe.mean()), "nfe_max": int(nfe.max()),
            "tokens_per_call": task.answer_length / float(nfe.mean()), "batch_calls": calls}
