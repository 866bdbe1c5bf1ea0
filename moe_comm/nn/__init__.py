"""Expert-parallel MoE building blocks: :class:`ExpertParallelMoE`, :class:`GroupedExperts`.

See :mod:`moe_comm.nn.moe` for the split-phase API (``dispatch_async`` / ``compute_experts`` /
``combine_async``) a pipeline scheduler uses to overlap one micro-batch's communication with another's compute.
"""

from moe_comm.nn._ops import Dispatched, PendingCombine, PendingDispatch
from moe_comm.nn.moe import ExpertParallelMoE, GroupedExperts, expert_permutation, run_experts

# Entry points first.
__all__ = ["ExpertParallelMoE", "GroupedExperts", "Dispatched", "PendingDispatch", "PendingCombine", "expert_permutation", "run_experts"]
