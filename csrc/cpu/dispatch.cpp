// moe_comm._cpu, dispatch's host work on CPU ranks (moe_comm/cpu_kernels.py).
//
// localize_topk: the received top-k in one pass: global expert ids -> local ids (-1 where the expert lives on
// another rank), weights zeroed where the id is not local, and a count per local expert.
#include <algorithm>

#include "common.h"

namespace moe_comm::cpu {

// A few hundred KiB at most: one thread, no vector clones (the loop is bound by its stores and the counts).
void localize_topk(uint64_t global_ids_address, int64_t ids_row_stride, uint64_t weights_address,
                   int64_t weights_row_stride, int64_t num_rows, int64_t num_topk, int64_t first_expert,
                   int64_t num_local_experts, uint64_t local_ids_address, uint64_t local_weights_address,
                   uint64_t counts_address) {
  if (num_rows < 0 || num_topk < 0 || num_local_experts < 0) fail("sizes must be >= 0");
  if (ids_row_stride < num_topk) fail("global_ids: row stride " + std::to_string(ids_row_stride) + " < num_topk");
  if (weights_address != 0 && weights_row_stride < num_topk)
    fail("weights: row stride " + std::to_string(weights_row_stride) + " < num_topk");
  require_pointer(counts_address, "counts");
  auto* counts = as_pointer<int64_t>(counts_address);
  std::fill(counts, counts + num_local_experts, int64_t(0));
  if (num_rows == 0 || num_topk == 0) return;
  require_pointer(global_ids_address, "global_ids");
  require_pointer(local_ids_address, "local_ids");
  if ((weights_address == 0) != (local_weights_address == 0)) fail("weights, local_weights: give both or neither");
  const auto* ids = as_pointer<const int32_t>(global_ids_address);
  const auto* weights = as_pointer<const float>(weights_address);
  auto* local_ids = as_pointer<int64_t>(local_ids_address);
  auto* local_weights = as_pointer<float>(local_weights_address);
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t k = 0; k < num_topk; ++k) {
      // Unsigned compare: ids below first_expert (-1 included) wrap around to huge values.
      const uint64_t local = uint64_t(int64_t(ids[r * ids_row_stride + k]) - first_expert);
      const bool here = local < uint64_t(num_local_experts);
      local_ids[r * num_topk + k] = here ? int64_t(local) : -1;
      if (here) ++counts[local];
      if (weights != nullptr) local_weights[r * num_topk + k] = here ? weights[r * weights_row_stride + k] : 0.0f;
    }
  }
}

}  // namespace moe_comm::cpu
