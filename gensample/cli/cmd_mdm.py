"""`gensample train mdm`: train the small masked-diffusion transformer shipped as zoo `mdm-text`.

Forward process: the linear schedule alpha_t = 1 - t; each character is masked with probability
t, t ~ U(0, 1) stratified over the batch. Training loss: mean cross-entropy over masked positions.
Every positive weighting of the per-t losses has the same minimiser, the true conditional
mu*(x)[i, v] (Zheng et al. 2024, sec. 3), and the unweighted mean has far lower variance than the
ELBO's 1/t weights. The reported validation number is the proper MDLM NELBO (Sahoo et al. 2024,
eq. 10: (1/t) * sum of masked -log mu, per character), an upper bound on the NLL in nats/char.
The network gets no time input (time-agnostic).

Corpus: docstrings of a fixed list of Python standard-library modules (offline, no download),
whitespace collapsed to single spaces, characters outside printable ASCII mapped to a space. The
corpus actually used is written next to the weights (corpus.txt) so a retrain can reuse it exactly.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import sys
import time
from pathlib import Path

import click

ALPHABET = "".join(chr(c) for c in range(32, 127))  # printable ASCII: 95 symbols, space first
CORPUS_MODULES = (
    "argparse", "bisect", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "enum", "fractions", "functools", "heapq", "inspect", "itertools", "json", "logging",
    "os", "pathlib", "pprint", "queue", "random", "re", "shutil", "statistics", "string",
    "subprocess", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)


def docstring_corpus(modules=CORPUS_MODULES) -> str:
    """Docstrings of the modules, their public classes, functions and methods, one paragraph each."""
    seen: set[int] = set()
    parts: list[str] = []

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and id(doc) not in seen and len(doc) > 40:
            seen.add(id(doc))
            parts.append(doc)

    for name in modules:
        mod = importlib.import_module(name)
        add(mod)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                add(obj)
            if inspect.isclass(obj):
                for meth_name, meth in sorted(vars(obj).items()):
                    if not meth_name.startswith("_") and inspect.isfunction(meth):
                        add(meth)
    text = " ".join(re.sub(r"\s+", " ", p).strip() for p in parts)
    allowed = set(ALPHABET)
    return "".join(c if c in allowed else " " for c in text)


def train_mdm(corpus: str, out_dir: Path, *, steps: int, batch_size: int, length: int, d_model: int,
              num_layers: int, num_heads: int, lr: float, seed: int, max_minutes: float, log_every: int = 50) -> dict:
    import torch

    from ..models.masked_lm import CharTokenizer, MaskedDiffusionTransformer
    from ..train import save_masked_lm

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tok = CharTokenizer(ALPHABET)
    data = torch.tensor(tok.encode(corpus), dtype=torch.long)
    n_val = max(length * 64, len(data) // 20)
    train_ids, val_ids = data[:-n_val], data[-n_val:]
    net = MaskedDiffusionTransformer(vocab_size=tok.vocab_size, max_length=length, d_model=d_model,
                                     num_layers=num_layers, num_heads=num_heads)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    mask_id = tok.mask_token_id

    def batch_from(ids, n, g):
        start = torch.randint(0, len(ids) - length, (n,), generator=g)
        return torch.stack([ids[s : s + length] for s in start.tolist()])  # (n, L)

    def losses(x0, g):
        """(NELBO per char, mean CE over masked positions) on one batch."""
        n = x0.shape[0]
        t = ((torch.rand((), generator=g) + torch.arange(n) / n) % 1.0).clamp_min(1e-3)  # (n,) stratified
        masked = torch.rand(x0.shape, generator=g) < t[:, None]  # (n, L)
        x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
        logp = torch.log_softmax(net(x_t).float(), -1).gather(-1, x0[..., None])[..., 0]  # (n, L)
        nelbo = -(logp * masked / t[:, None]).sum() / x0.numel()
        ce = -(logp * masked).sum() / masked.sum().clamp_min(1)
        return nelbo, ce

    rows = []
    t_start = time.perf_counter()
    warmup = min(100, steps // 10 + 1)
    net.train()
    done = 0
    for step in range(1, steps + 1):
        # cosine decay over the larger of step and wall-time progress (so --max-minutes still anneals)
        frac = max((step - warmup) / max(1, steps - warmup), (time.perf_counter() - t_start) / (max_minutes * 60))
        scale = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        _, loss = losses(batch_from(train_ids, batch_size, gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        done = step
        elapsed = time.perf_counter() - t_start
        if step % log_every == 0 or step == 1:
            rows.append({"step": step, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1)})
            click.echo(f"step {step:5d}  masked CE {float(loss.detach()):.4f}  ({elapsed:.0f} s)", err=True)
        if elapsed > max_minutes * 60 and step < steps:
            click.echo(f"stopping at step {step}: --max-minutes {max_minutes} reached", err=True)
            break
    net.eval()
    g_val = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        val_pairs = [losses(batch_from(val_ids, 64, g_val), g_val) for _ in range(16)]
    val = sum(float(v[0]) for v in val_pairs) / len(val_pairs)
    val_ce = sum(float(v[1]) for v in val_pairs) / len(val_pairs)
    save_masked_lm(out_dir, net, tok, rows)
    info = {"steps_done": done, "val_nelbo_per_char_nats": val, "val_masked_ce_nats": val_ce, "val_bits_per_char_bound": val / math.log(2),
            "train_seconds": round(time.perf_counter() - t_start, 1), "corpus_chars": len(data),
            "num_parameters": sum(p.numel() for p in net.parameters()), "torch": torch.__version__,
            "python": sys.version.split()[0]}
    return info


@click.command("mdm")
@click.option("-o", "--output", type=click.Path(file_okay=False), default="gensample/zoo/data/mdm-text", show_default=True,
              help="Output folder (weights, config, tokenizer, loss curve, corpus).")
@click.option("--corpus", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Plain-text corpus; default: docstrings of a fixed list of standard-library modules.")
@click.option("--steps", type=click.IntRange(min=1), default=2500, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--length", type=click.IntRange(min=8, max=1024), default=64, show_default=True)
@click.option("--d-model", type=click.IntRange(min=16), default=128, show_default=True)
@click.option("--num-layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--num-heads", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=13.0, show_default=True,
              help="Stop early after this much wall time (single-threaded CPU).")
def train_mdm_cmd(output, corpus, steps, batch_size, length, d_model, num_layers, num_heads, lr, seed, max_minutes):
    """Train the masked-diffusion character transformer (zoo `mdm-text`)."""
    out = Path(output)
    text = Path(corpus).read_text(errors="replace") if corpus else docstring_corpus()
    if len(text) < 20 * length:
        raise click.BadParameter(f"corpus has {len(text)} characters; need at least {20 * length}", param_hint="--corpus")
    allowed = set(ALPHABET)
    text = "".join(c if c in allowed else " " for c in re.sub(r"\s+", " ", text))
    info = train_mdm(text, out, steps=steps, batch_size=batch_size, length=length, d_model=d_model,
                     num_layers=num_layers, num_heads=num_heads, lr=lr, seed=seed, max_minutes=max_minutes)
    (out / "corpus.txt").write_text(text)
    info["command"] = "gensample train mdm " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["train", "mdm"] else None
    info["options"] = {"steps": steps, "batch_size": batch_size, "length": length, "d_model": d_model,
                       "num_layers": num_layers, "num_heads": num_heads, "lr": lr, "seed": seed,
                       "max_minutes": max_minutes, "corpus": corpus or "stdlib docstrings: " + ",".join(CORPUS_MODULES)}
    (out / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    click.echo(f"saved to {out}: val NELBO {info['val_nelbo_per_char_nats']:.3f} nats/char after {info['steps_done']} steps")


def register(main) -> None:
    main.commands["train"].add_command(train_mdm_cmd)
