"""dualpipe: DualPipe / DualPipeV pipeline schedules as data (IR, generators, validator, simulator).

Entry points: :func:`dualpipe.schedules.generate`, :func:`dualpipe.validate.validate`,
:func:`dualpipe.simulate.simulate`; ``python -m dualpipe.visualize`` draws a schedule.
"""

from dualpipe.ir import Action, Kind, Schedule, ScheduleError, Topology

__all__ = [
    # schedule IR
    "Action",
    "Kind",
    "Schedule",
    "ScheduleError",
    "Topology",
]
