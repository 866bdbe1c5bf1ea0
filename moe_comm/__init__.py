"""moe_comm: expert-parallel token dispatch and combine for Mixture-of-Experts models.

Entry points: :class:`Buffer` (dispatch/combine), :func:`all_to_all_single` (drop-in for torch's),
:func:`available_backends`, :mod:`moe_comm.functional` (autograd), :mod:`moe_comm.nn` (MoE layer),
:mod:`moe_comm.integrations.transformers`, :mod:`moe_comm.launch` (torchrun/mpirun/spawn),
:mod:`moe_comm.model` (cost model), :mod:`moe_comm.doctor`, :mod:`moe_comm.bench`, :mod:`moe_comm.deep_ep` (DeepEP's
Python API on top of all this, for code written against ``deep_ep``).
"""

from moe_comm.alltoall import all_to_all_single
from moe_comm.backends.registry import available_backends
from moe_comm.buffer import Buffer
from moe_comm.errors import BufferCapacityError, CommTimeoutError, PeerArgumentError
from moe_comm.events import EventOverlap
from moe_comm.nn import ExpertParallelMoE, GroupedExperts
from moe_comm.types import (
    CombineResult,
    Config,
    DispatchHandle,
    DispatchLayout,
    DispatchResult,
    LowLatencyCombineResult,
    LowLatencyDispatchResult,
    LowLatencyHandle,
)

__version__ = "0.1.0"

# Entry points first, then the typed results they return.
__all__ = [
    "Buffer",
    "all_to_all_single",
    "available_backends",
    "ExpertParallelMoE",
    "GroupedExperts",
    "BufferCapacityError",
    "CommTimeoutError",
    "PeerArgumentError",
    "EventOverlap",
    "Config",
    "DispatchHandle",
    "DispatchLayout",
    "DispatchResult",
    "CombineResult",
    "LowLatencyHandle",
    "LowLatencyDispatchResult",
    "LowLatencyCombineResult",
]
