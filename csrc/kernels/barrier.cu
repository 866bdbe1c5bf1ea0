// Device-side barrier across ranks through a peer-pointer table of per-rank counter arrays.
// counters[r] points at rank r's int[num_ranks] (symmetric buffer header); rank `rank` increments slot
// `rank` on every peer, then waits until each of its own slots reached `epoch`. Bounded by timeout_ns.
#include "../include/api.cuh"
#include "../include/exception.cuh"
#include "../include/launch.cuh"
#include "../include/layout.cuh"
#include "../include/ptx.cuh"

namespace moe_comm {
namespace {

__global__ void barrier_kernel(int* const* counters, int rank, int num_ranks, int epoch, long long timeout_ns,
                               TimeoutRecord* err) {
  const int peer = threadIdx.x;
  if (peer >= num_ranks) return;
  atomic_add_release_sys(counters[peer] + rank, 1);
  wait_reached(counters[rank] + peer, epoch, timeout_ns, err, rank, peer, kPhaseBarrier);
}

}  // namespace

void launch_barrier(int* const* counters_table, int rank, int num_ranks, int epoch, long long timeout_ns,
                    void* err_record, cudaStream_t stream) {
  // The header holds kMaxRanks barrier slots; more ranks would write over the slots after them.
  MC_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "num_ranks must be in [1, 8]");
  MC_CHECK(rank >= 0 && rank < num_ranks, "rank must be in [0, num_ranks)");
  MC_CHECK(timeout_ns > 0, "timeout_ns must be > 0");
  launch_kernel(barrier_kernel, 1, 32, 0, stream, counters_table, rank, num_ranks, epoch, timeout_ns,
                static_cast<TimeoutRecord*>(err_record));
}

}  // namespace moe_comm
