"""Local multi-process launch (`gensample run --num-processes N`): placeholder until sharding lands."""

from __future__ import annotations


def launch_processes(num_processes: int, argv: list[str]) -> None:
    raise ValueError("--num-processes > 1 is not supported yet; run with one process")
