"""dualpipe: DualPipe / DualPipeV pipeline schedules as data (IR, generators, validator, simulator).

Entry points: :func:`generate` (or :func:`dualpipe.schedules.dualpipev` etc.), :func:`validate`,
:func:`simulate`; ``python -m dualpipe.visualize`` draws and compares schedules.
"""

from dualpipe.ir import Action, Kind, Schedule, ScheduleError, Topology
from dualpipe.schedules import SCHEDULES, dualpipe, dualpipev, generate, one_f_one_b, zb1p
from dualpipe.simulate import Costs, Event, SimResult, simulate
from dualpipe.validate import check_counts, check_p2p_fifo, lower_to_p2p, validate

__all__ = [
    # entry points
    "generate",
    "validate",
    "simulate",
    # generators
    "SCHEDULES",
    "dualpipe",
    "dualpipev",
    "one_f_one_b",
    "zb1p",
    # passes and checks
    "check_counts",
    "check_p2p_fifo",
    "lower_to_p2p",
    # schedule IR
    "Action",
    "Kind",
    "Schedule",
    "ScheduleError",
    "Topology",
    # simulator types
    "Costs",
    "Event",
    "SimResult",
]
