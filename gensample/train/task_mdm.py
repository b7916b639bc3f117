"""Train ``mdm-add``: a small masked-diffusion character transformer that adds two integers.

Task (character level, fixed width): ``"a+b=c"`` with ``a, b`` drawn uniformly from
``[0, 10^D)`` and written with ``D`` digits (leading zeros), ``c = a + b`` written with ``D + 1``
digits. The prompt ``"a+b="`` is never masked; the model learns to fill the ``D + 1`` answer
positions. Every answer is checkable, so sampling quality is an exact-match accuracy
(``gensample.eval.task_accuracy``).

Forward process (prompt-conditional masked diffusion, as in LLaDA's supervised fine-tuning: the
prompt stays clean and only the response is masked; Nie et al. 2025, arXiv 2502.09992, sec. 2.3):
the number of masked answer positions ``k`` is uniform on ``{1, ..., D + 1}`` and the masked set is
a uniform subset of that size. Loss: mean cross-entropy over the masked answer positions. Any
positive weighting of the per-``k`` losses has the same minimiser, the true conditional of each
masked position given the visible ones (Zheng et al. 2024, arXiv 2409.02908, sec. 3), so the network
is time-agnostic and a uniform ``k`` trains every mask count a sampler will meet equally often. (The
linear schedule's ``t ~ U(0, 1)`` gives the same law of ``k`` up to the ``k = 0`` case, which
carries no loss.)

Reproducible from one command, single-threaded CPU, minutes::

    python -m gensample.train.task_mdm --out gensample/zoo/data/mdm-add

Training stops when the greedy (most-confident-first) exact-match accuracy on a fixed held-out
set reaches ``--target-accuracy``, or after ``--steps`` / ``--max-minutes``. The held-out set is
drawn from its own seed and is not removed from training: a held-out problem was among the
``steps * batch_size`` training draws with probability at most ``steps * batch_size / 10^(2D)``
(0.2 % for the shipped model: 1500 * 128 draws, 10^8 problems).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ALPHABET = "0123456789+= "  # digits first (ids 0..9), then '+', '=', space (the CharTokenizer's unknown)
DIGIT_IDS = tuple(range(10))


@dataclass(frozen=True)
class AdditionTask:
    """Fixed-width addition ``a+b=c``: ``digits`` per operand, ``digits + 1`` in the answer."""

    digits: int = 4

    def __post_init__(self):
        if not (isinstance(self.digits, int) and 1 <= self.digits <= 9):
            raise ValueError(f"digits must be an int in [1, 9], got {self.digits!r}")

    @property
    def prompt_length(self) -> int:
        return 2 * self.digits + 2  # "a+b="

    @property
    def answer_length(self) -> int:
        return self.digits + 1

    @property
    def length(self) -> int:
        return self.prompt_length + self.answer_length

    def prompt(self, a: int, b: int) -> str:
        d = self.digits
        return f"{a:0{d}d}+{b:0{d}d}="

    def answer(self, a: int, b: int) -> str:
        return f"{a + b:0{self.answer_length}d}"

    def operands(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 2) int64 operands, uniform on [0, 10^digits), drawn on the generator's device (CPU)."""
        return torch.randint(0, 10 ** self.digits, (n, 2), generator=generator)

    def token_rows(self, ab: torch.Tensor) -> torch.Tensor:
        """(n, L) token ids of the full strings ``a+b=c`` (ALPHABET ids) from (n, 2) operands."""
        a, b = ab[:, 0], ab[:, 1]
        d, g = self.digits, self.answer_length
        plus, eq = ALPHABET.index("+"), ALPHABET.index("=")

        def digits_of(v, width):  # (n, width) most significant digit first
            powers = 10 ** torch.arange(width - 1, -1, -1, dtype=torch.long)
            return (v[:, None] // powers) % 10

        n = ab.shape[0]
        return torch.cat([digits_of(a, d), torch.full((n, 1), plus), digits_of(b, d), torch.full((n, 1), eq),
                          digits_of(a + b, g)], 1)  # (n, L)


@dataclass
class TaskTrainConfig:
    """Options of ``train_task_mdm`` (defaults: the shipped ``mdm-add``)."""

    digits: int = 4
    steps: int = 3000
    batch_size: int = 128
    d_model: int = 96
    num_layers: int = 3
    num_heads: int = 4
    ff_mult: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    max_minutes: float = 20.0  # safety stop only (the result then depends on the machine's speed)
    eval_every: int = 250
    eval_size: int = 512
    target_accuracy: float = 0.99


def mask_answers(x0: torch.Tensor, prompt_length: int, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """Mask ``k ~ U{1..G}`` uniformly chosen answer positions per row (G = L - prompt_length). (n, L) -> (n, L)."""
    n, L = x0.shape
    g = L - prompt_length
    k = torch.randint(1, g + 1, (n, 1), generator=generator)  # (n, 1)
    rank = torch.rand((n, g), generator=generator).argsort(1).argsort(1)  # (n, G) a uniform permutation
    masked = torch.zeros_like(x0, dtype=torch.bool)
    masked[:, prompt_length:] = rank < k
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


@torch.no_grad()
def greedy_accuracy(net, task: AdditionTask, ab: torch.Tensor, mask_id: int) -> float:
    """Exact-match accuracy of most-confident-first decoding, one answer digit per network call.

    A training monitor only (deterministic, digits only); the sampler study uses
    ``gensample.eval.task_accuracy``.
    """
    target = task.token_rows(ab)  # (n, L)
    x = target.clone()
    x[:, task.prompt_length:] = mask_id
    for _ in range(task.answer_length):
        logp = torch.log_softmax(net(x)[..., : len(DIGIT_IDS)].double(), -1)  # (n, L, 10)
        conf, tok = logp.max(-1)  # (n, L)
        conf = conf.masked_fill(x != mask_id, -math.inf)
        pos = conf.argmax(1)  # (n,)
        rows = torch.arange(x.shape[0])
        x[rows, pos] = tok[rows, pos]
    return float((x == target).all(1).double().mean())


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_task_mdm(out_dir: str | Path, cfg: TaskTrainConfig = TaskTrainConfig(), *, log=_log,
                   command: str | None = None) -> dict:
    """Train and save (config.json + safetensors, tokenizer.json, loss.csv, train.json) to ``out_dir``;
    ``command`` (the command line that ran it), if given, is recorded in train.json."""
    from ..io import atomic_write_bytes
    from ..models.masked_lm import CharTokenizer, MaskedDiffusionTransformer
    from . import save_masked_lm

    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    task = AdditionTask(cfg.digits)
    tok = CharTokenizer(ALPHABET)
    mask_id = tok.mask_token_id
    net = MaskedDiffusionTransformer(vocab_size=tok.vocab_size, max_length=task.length, d_model=cfg.d_model,
                                     num_layers=cfg.num_layers, num_heads=cfg.num_heads, ff_mult=cfg.ff_mult)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_ab = task.operands(cfg.eval_size, torch.Generator().manual_seed(cfg.seed + 10_000))
    warmup = min(200, cfg.steps // 10 + 1)
    rows, evals = [], []
    t_start = time.perf_counter()
    done, stop_reason = 0, "steps"
    net.train()
    for step in range(1, cfg.steps + 1):
        # linear warmup, cosine decay over the step budget: a function of the step only, so a rerun with the
        # recorded options replays the same updates whatever the machine's load (--max-minutes is a safety stop)
        frac = (step - warmup) / max(1, cfg.steps - warmup)
        scale = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * max(scale, 0.02)
        x0 = task.token_rows(task.operands(cfg.batch_size, gen))  # (n, L)
        x_t = mask_answers(x0, task.prompt_length, mask_id, gen)
        masked = x_t == mask_id
        logits = net(x_t).float()  # (n, L, V)
        loss = torch.nn.functional.cross_entropy(logits[masked], x0[masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        done = step
        elapsed = time.perf_counter() - t_start
        if step % 50 == 0 or step == 1:
            rows.append({"step": step, "loss": round(float(loss.detach()), 5), "lr": opt.param_groups[0]["lr"],
                         "elapsed_s": round(elapsed, 1)})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            net.eval()
            acc = greedy_accuracy(net, task, eval_ab, mask_id)
            net.train()
            evals.append({"step": step, "greedy_accuracy": acc, "elapsed_s": round(elapsed, 1)})
            log(f"step {step:6d}  masked CE {float(loss.detach()):.4f}  greedy accuracy {acc:.3f}  ({elapsed:.0f} s)")
            if acc >= cfg.target_accuracy:
                stop_reason = "target_accuracy"
                break
        if elapsed > cfg.max_minutes * 60:
            stop_reason = "max_minutes"
            break
    net.eval()
    final_acc = greedy_accuracy(net, task, eval_ab, mask_id)
    out = Path(out_dir)
    save_masked_lm(out, net, tok, rows)
    info = {"task": {"name": "addition", "digits": cfg.digits, "prompt_length": task.prompt_length,
                     "answer_length": task.answer_length, "length": task.length},
            "steps_done": done, "stop_reason": stop_reason, "greedy_accuracy": final_acc,
            "greedy_eval_size": cfg.eval_size, "evals": evals,
            "train_seconds": round(time.perf_counter() - t_start, 1),
            "num_parameters": sum(p.numel() for p in net.parameters()),
            "torch": torch.__version__, "python": sys.version.split()[0], "options": asdict(cfg)}
    if command is not None:
        info["command"] = command
    atomic_write_bytes(out / "train.json", (json.dumps(info, indent=1) + "\n").encode())
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (e.g. gensample/zoo/data/mdm-add)")
    defaults = TaskTrainConfig()
    for name, value in asdict(defaults).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = ap.parse_args(argv)
    cfg = TaskTrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.max_minutes <= 0 or cfg.eval_every < 1:
        ap.error("--steps, --batch-size, --eval-every must be >= 1 and --max-minutes > 0")
    try:
        AdditionTask(cfg.digits)
    except ValueError as err:
        ap.error(f"--digits: {err}")
    command = "python -m gensample.train.task_mdm " + " ".join(sys.argv[1:] if argv is None else argv)
    info = train_task_mdm(args.out, cfg, command=command)
    print(f"saved to {args.out}: greedy accuracy {info['greedy_accuracy']:.3f} after {info['steps_done']} steps "
          f"({info['stop_reason']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
