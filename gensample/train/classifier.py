"""Train the digits feature network (`gensample train classifier`).

A small CNN classifier on the digits train split (gensample.eval.digits_data). Its penultimate
layer is the feature space of digits-FID (the role Inception-v3 pool3 plays in Heusel et al.
2017, arXiv 1706.08500) and its predictions score class-conditional samples. Augmentation:
random shifts by up to one pixel (background fill -1). Deterministic for a given seed.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass(frozen=True)
class ClassifierTrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    feature_dim: int = 64
    max_shift: int = 1

    def __post_init__(self):
        for name in ("epochs", "batch_size", "feature_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_shift not in (0, 1, 2):
            raise ValueError(f"max_shift must be one of (0, 1, 2), got {self.max_shift}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


class DigitsCNN(torch.nn.Module):
    """(N, 1, 8, 8) in [-1, 1] -> logits (N, 10); ``features`` gives the (N, F) penultimate layer."""

    def __init__(self, feature_dim: int = 64):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 64, 4, 4)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 64, 2, 2)
            nn.Flatten(),  # (N, 256)
            nn.Linear(256, feature_dim), nn.ReLU(),  # (N, F): the feature layer
        )
        self.head = nn.Linear(feature_dim, 10)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each (1, 8, 8) image by (dy, dx) in [-max_shift, max_shift]^2, filling with -1."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)  # (N, 1, h+2s, w+2s)
    d = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = pad[i, :, d[i, 0] : d[i, 0] + h, d[i, 1] : d[i, 1] + w]
    return out


def train_classifier(out: str | Path, cfg: ClassifierTrainConfig = ClassifierTrainConfig(), *, threads: int | None = 1,
                     progress: bool = True, command: list[str] | None = None) -> dict:
    """Train on the train split, report held-out accuracy, save weights + config + log in OUT."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..api import atomic_write_json
    from ..eval.digits_data import real_digits

    if threads is not None:
        torch.set_num_threads(int(threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    net = DigitsCNN(cfg.feature_dim)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    x_tr, y_tr = (torch.from_numpy(a) for a in real_digits("train"))
    x_te, y_te = (torch.from_numpy(a) for a in real_digits("test"))
    g = torch.Generator().manual_seed(cfg.seed)
    curve, t0 = [], time.time()
    for epoch in tqdm(range(cfg.epochs), desc="train classifier", disable=not progress):
        net.train()
        perm = torch.randperm(len(x_tr), generator=g)
        total = 0.0
        for k in range(0, len(perm), cfg.batch_size):
            idx = perm[k : k + cfg.batch_size]
            xb = random_shift(x_tr[idx], cfg.max_shift, g)
            loss = torch.nn.functional.cross_entropy(net(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        net.eval()
        with torch.no_grad():
            acc = (net(x_te).argmax(1) == y_te).double().mean().item()
        curve.append({"epoch": epoch + 1, "train_loss": total / len(x_tr), "test_accuracy": acc})
    with torch.no_grad():
        train_acc = (net(x_tr).argmax(1) == y_tr).double().mean().item()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / WEIGHTS))
    atomic_write_json(out / CONFIG, {"feature_dim": cfg.feature_dim})
    log = {
        "command": command if command is not None else sys.argv,
        "config": asdict(cfg),
        "test_accuracy": curve[-1]["test_accuracy"],
        "train_accuracy": train_acc,
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "wall_time_s": time.time() - t0,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "curve": curve,
    }
    atomic_write_json(out / "train_log.json", log)
    return log


def load_classifier(folder: str | Path) -> DigitsCNN:
    """A trained DigitsCNN from a folder written by ``train_classifier`` (eval mode)."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"no classifier weights at {folder / WEIGHTS}")
    cfg = json.loads((folder / CONFIG).read_text())
    net = DigitsCNN(int(cfg["feature_dim"]))
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    return net.eval().requires_grad_(False)
