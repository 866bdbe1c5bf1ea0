"""dualpipe: DualPipe / DualPipeV pipeline schedules as data (IR, generators, validator, simulator).

Entry points: :func:`generate` (or :func:`dualpipe.schedules.dualpipev` etc.), :func:`validate`,
:func:`simulate`; ``python -m dualpipe.visualize`` draws and compares schedules.

Example::

    from dualpipe import Costs, generate, lower_to_p2p, simulate, validate

    plan = generate("dualpipev", num_ranks=4, num_chunks=16)  # per-rank tuples of Action ("0F3", ...)
    validate(plan)                                            # raises ScheduleError with the marked grid
    lowered = lower_to_p2p(plan)                              # adds SEND_F/RECV_F/SEND_B/RECV_B
    result = simulate(plan, Costs(F=1, B=2, W=1, FB=3))       # result.max_bubble == 6 (= (8/2-1)(3+2-3))
"""

from dualpipe.executor import WeightGradStore
from dualpipe.ir import Action, Kind, Schedule, ScheduleError, Topology
from dualpipe.pipeline import DualPipe, DualPipeV, PipelineRunner
from dualpipe.schedules import SCHEDULES, dualpipe, dualpipev, generate, one_f_one_b, zb1p
from dualpipe.simulate import Costs, Event, SimResult, simulate
from dualpipe.validate import check_counts, check_p2p_fifo, lower_to_p2p, validate

__all__ = [
    # runtime
    "DualPipe",
    "DualPipeV",
    "PipelineRunner",
    "WeightGradStore",
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
