"""Sampling at scale: process topology, index sharding, float64 statistic reductions, model casting.

Work unit = the global sample index (a whole particle group for FKC-style samplers); sample i
is drawn from ``sample_seed(seed, i)`` on a CPU generator, so the sample set does not depend on
the world size (README "Scaling out", docs/scaling.md). Each process takes a *contiguous* chunk of groups,
the first ``n_groups % world_size`` processes one group more (accelerate's
``split_between_processes`` without padding, so nothing is drawn twice).

Processes are found through the usual launcher environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), as set by ``accelerate launch``, ``torchrun``
or ``gensample.api.launch_local`` (``gensample run --num-processes N``); the process group is created by
accelerate's ``PartialState`` (gloo on CPU, NCCL on CUDA).

FID statistics (EDM ``fid.py`` style): each process accumulates the feature count, the feature
sum and the sum of outer products in float64; one all-reduce of those three gives the exact
global mean and covariance without gathering any image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

WORLD_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


# -- topology ---------------------------------------------------------------------------------
def env_world_size() -> int:
    """World size announced by a launcher in the environment (1 when not launched)."""
    for key in WORLD_ENV:
        value = os.environ.get(key)
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise ValueError(f"environment variable {key} must be an integer, got {value!r}") from None
    return 1


@dataclass
class ProcessInfo:
    """Where this process stands: rank ``index`` of ``world_size``; ``device`` to sample on."""

    index: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    state: Any = None  # accelerate.PartialState when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        """Barrier (accelerate ``wait_for_everyone``); a no-op for one process."""
        if self.world_size > 1:
            self.state.wait_for_everyone()

    def gather_object(self, obj) -> list:
        """Picklable objects of every rank, in rank order (``[obj]`` for one process)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


def process_info(device: torch.device) -> ProcessInfo:
    """The current process's place in the launch; creates accelerate's PartialState if launched.

    device: the device resolved from ``--device``; under a multi-process launch a CUDA request
    becomes this process's own GPU (``cuda:LOCAL_RANK``), CPU stays CPU (gloo backend).
    """
    if env_world_size() == 1:
        return ProcessInfo(0, 1, device)
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes == 1:  # accelerate did not see a usable launch
        return ProcessInfo(0, 1, device)
    run_device = device if device.type == "cpu" else state.device
    return ProcessInfo(state.process_index, state.num_processes, torch.device(run_device), state)


# -- sharding ---------------------------------------------------------------------------------
def split_indices(indices: Sequence[int], world_size: int, rank: int, group_size: int = 1) -> list[int]:
    """Rank ``rank``'s contiguous chunk of ``indices``, never splitting a group of ``group_size``.

    indices: the global work list, a multiple of group_size long (groups are consecutive runs).
    With G groups, ranks 0..G%W-1 get G//W + 1 groups and the rest G//W (accelerate's
    ``split_between_processes`` without padding). Chunks are disjoint and cover ``indices``.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size - 1}], got {rank!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    indices = list(indices)
    if len(indices) % group_size:
        raise ValueError(f"len(indices) ({len(indices)}) must be a multiple of group_size ({group_size})")
    n_groups = len(indices) // group_size
    base, extra = divmod(n_groups, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return indices[start * group_size : stop * group_size]


# -- float64 feature statistics (FID) -------------------------------------------------------
@dataclass
class FeatureStats:
    """Running sums for a Gaussian fit of features (FID, Heusel et al. 2017, eq. 6).

    count: number of feature rows; sum: (D,) float64 sum of rows; outer: (D, D) float64 sum of
    x x^T. Sums (not means) merge exactly by addition across batches and processes.
    """

    count: int
    sum: torch.Tensor  # (D,) float64
    outer: torch.Tensor  # (D, D) float64

    @classmethod
    def zeros(cls, dim: int) -> "FeatureStats":
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        return cls(0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    @classmethod
    def of(cls, features: torch.Tensor) -> "FeatureStats":
        """Stats of one (N, D) feature batch."""
        features = _check_features(features)
        return cls(features.shape[0], features.sum(0), features.T @ features)

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def update(self, features: torch.Tensor) -> "FeatureStats":
        """Add an (N, D) batch in place (float64 accumulation); returns self."""
        features = _check_features(features, self.dim)
        self.count += features.shape[0]
        self.sum += features.sum(0).to(self.sum.device)
        self.outer += (features.T @ features).to(self.outer.device)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Stats of the union of both feature sets (a new object)."""
        if not isinstance(other, FeatureStats):
            raise TypeError(f"other must be FeatureStats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"feature dimensions differ: {self.dim} vs {other.dim}")
        return FeatureStats(self.count + other.count, self.sum + other.sum.to(self.sum.device),
                            self.outer + other.outer.to(self.outer.device))

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu (D,), sigma (D, D)) float64; sigma is the unbiased covariance (n - 1 denominator)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got count={self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu, sigma


def _check_features(features, dim: int | None = None) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor of shape (N, D), got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {tuple(features.shape)}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"features must have D={dim} columns, got {features.shape[1]}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN/Inf")
    return features.double()


def all_reduce_feature_stats(stats: FeatureStats, info: ProcessInfo | None = None) -> FeatureStats:
    """Sum FeatureStats over all processes (float64 all-reduce); every rank gets the total.

    A no-op for one process. On NCCL the sums travel on this process's GPU.
    """
    if info is not None:
        world = info.world_size
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    else:
        world = 1
    if world == 1:
        return FeatureStats(stats.count, stats.sum.clone(), stats.outer.clone())
    dev = info.device if info is not None else stats.sum.device
    if torch.distributed.get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    d = stats.dim
    count = torch.tensor([float(stats.count)], dtype=torch.float64)  # exact below 2**53
    flat = torch.cat([count, stats.sum.cpu(), stats.outer.cpu().reshape(-1)]).to(dev)  # (1 + D + D*D,)
    torch.distributed.all_reduce(flat)  # SUM
    flat = flat.cpu()
    count = int(round(flat[0].item()))
    return FeatureStats(count, flat[1 : 1 + d].clone(), flat[1 + d :].reshape(d, d).clone())


# -- model precision ------------------------------------------------------------------------
def cast_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    """Move to ``device``; cast float16/32/bf16 parameters and buffers to ``dtype``.

    float64 tensors (schedule tables such as ``alphas_cumprod``, exact-model constants) are left
    in float64: the network runs in half precision, the probability/schedule math does not
    (docs/scaling.md, GPU options: the network in half precision, the probability math not).
    """
    module.to(device=device)
    if dtype is None:
        return module

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t

    return module._apply(cast)


# -- local launch helpers (the launch itself: gensample.api.launch_local) ----------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for MASTER_PORT)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
