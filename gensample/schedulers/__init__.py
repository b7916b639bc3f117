"""The diffusers faces of gensample's methods: ``SchedulerMixin, ConfigMixin`` scheduler classes.

One file per method, named as its math file in ``gensample/samplers/`` (``schedulers/fkc.py`` is the
face of ``samplers/fkc.py``), mirroring diffusers' own ``schedulers/`` folder. Each is a thin shell:
the parameters, the pure math and the loop live in ``gensample.samplers.<method>`` and the shell
calls them; nothing in ``gensample.samplers`` imports this package.

- ``FKCScheduler`` (``schedulers.fkc``): Feynman-Kac Correctors, move + log-weight increment.
- ``TimeShiftScheduler``, ``make_time_shift_scheduler`` (``schedulers.time_shift``): TS-DDIM / TS-DDPM.
- ``FlowTimeShiftScheduler`` (``schedulers.flow_time_shift``): Time-Shift on flow-matching models (SD3, Flux),
  a FlowMatchEulerDiscreteScheduler with per-sample model times.
- ``DiSAHeadScheduler`` (``schedulers.disa``): MAR's respaced ancestral DDPM for a per-token head.
- ``MaskedDiffusionScheduler`` (``schedulers.first_hitting``): first-hitting / ancestral masked diffusion.
- ``FirstHittingBlockScheduler`` (``schedulers.first_hitting_block``): drop-in block scheduler for diffusers'
  LLaDA2Pipeline / DiffusionGemmaPipeline (first hitting and float64 confidence strategies in a block).
"""

from .disa import DiSAHeadScheduler, DiSAHeadSchedulerOutput
from .first_hitting import MaskedDiffusionScheduler, MaskedDiffusionSchedulerOutput
from .first_hitting_block import FirstHittingBlockScheduler, FirstHittingBlockSchedulerOutput
from .fkc import FKCScheduler, FKCSchedulerOutput
from .flow_time_shift import FlowTimeShiftScheduler
from .time_shift import TimeShiftScheduler, TimeShiftSchedulerOutput, make_time_shift_scheduler

__all__ = [
    "DiSAHeadScheduler", "DiSAHeadSchedulerOutput",
    "FirstHittingBlockScheduler", "FirstHittingBlockSchedulerOutput",
    "FKCScheduler", "FKCSchedulerOutput",
    "FlowTimeShiftScheduler",
    "MaskedDiffusionScheduler", "MaskedDiffusionSchedulerOutput",
    "TimeShiftScheduler", "TimeShiftSchedulerOutput", "make_time_shift_scheduler",
]
