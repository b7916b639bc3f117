"""Local multi-process launch (`gensample run --num-processes N`).

The work happens in :func:`gensample.parallel.launch_local` (the API's ``num_processes=N``
uses it too); this module keeps the CLI-facing name.
"""

from __future__ import annotations


def launch_processes(num_processes: int, sampler=None, model=None, config=None, **options):
    """Run one sampling job in ``num_processes`` local processes; returns the merged RunResult."""
    from ..parallel import launch_local

    return launch_local(num_processes, sampler=sampler, model=model, config=config, **options)
