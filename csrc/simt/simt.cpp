// The fiber scheduler behind simt.h: one launch at a time per process, a block at a time, a fiber per thread.
#include "simt.h"

#include <sched.h>
#include <sys/mman.h>

#include <random>
#include <stdexcept>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if MOE_COMM_SIMT_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace simt {
namespace {

constexpr size_t kStackBytes = 64 * 1024;  // per fiber; the kernels keep a few hundred bytes of locals
constexpr int kWarpSize = 32;

enum class State { kRunnable, kAtBarrier, kAtWarpOp, kExited };

struct Fiber {
  ThreadId id{};
  State state = State::kRunnable;
  void* tsan_fiber = nullptr;  // its ThreadSanitizer fiber (MOE_COMM_SIMT_TSAN builds)
  bool spun = false;  // gave way at a spin point, not at a barrier or collective
  // The collective or barrier it waits at, and its operands.
  const char* file = nullptr;
  int line = 0;
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0;
  int width = 0;
  uint64_t result = 0;
  uint8_t* stack = nullptr;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context{};
#endif
};

// The running launch (launches do not nest: a kernel launches nothing).
struct Launch {
  dim3 grid, block;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<uint8_t> smem;
  Fiber* running = nullptr;
  std::string error;
  // Completed block barriers, and completed __syncwarp of each warp, of the running block: their parity picks
  // the TSan token an arriving thread releases into (tsan_token_of).
  unsigned barriers_done = 0;
  std::vector<unsigned> syncwarps_done;
  int pool = 0;  // of the running block: its fibers, stacks and barrier tokens
  void* tsan_scheduler = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler{};
#endif
};

// The linker's bounds of section "simt_shared", where simt.h puts every __shared__ variable.
extern "C" __attribute__((visibility("hidden"))) uint8_t __start_simt_shared[];
extern "C" __attribute__((visibility("hidden"))) uint8_t __stop_simt_shared[];
// Aligns the section to 8 bytes: TSan keeps an access history per 8-byte cell and resets only whole cells
// (tsan_new_memory), and the statics alone may start the section at a 4-byte boundary.
alignas(8) __attribute__((section("simt_shared"), used)) uint8_t g_shared_alignment;

Launch g_launch;
Order g_order = Order::kForward;
std::mt19937_64 g_rng(0);
std::vector<LaunchShape> g_shapes;


// ThreadSanitizer's view of a launch (MOE_COMM_SIMT_TSAN builds, scripts/simt_tsan.sh). Every CUDA thread is a
// TSan fiber, and the scheduler switches between them without synchronising, so TSan orders two threads'
// accesses only where CUDA does: the launch's start and end, __syncthreads, __syncwarp, and the atomics. A write
// and another thread's access with none of these between them is reported as a race: a missing barrier, a
// write-after-read hazard on shared memory, or two blocks touching the same global memory, none of which the
// thread orders of a plain run can show. This file is compiled without instrumentation (its bookkeeping is not
// device memory) and makes the calls below.
//
// Blocks still run one after another, but TSan does not see them ordered: consecutive blocks run on two pools of
// fibers (and stacks, and barrier tokens) in turn, and a block's fibers synchronise only with the scheduler,
// which acquires nothing from them until the launch ends.
// A race between two blocks is therefore seen when they ran in pools of different parity (a block's fiber is
// ordered after the block of the same pool that it ran before); the orders of simt::configure vary which pairs
// those are. Each block starts with its shared memory new to TSan, as on a GPU, where it is the block's own.
#if MOE_COMM_SIMT_TSAN
constexpr int kPools = 2;
#else
constexpr int kPools = 1;
#endif
struct TsanTokens {  // addresses TSan synchronises on, never read or written
  char block_start, launch_end;
  char barrier[kPools][2];
  char syncwarp[kPools][32][2];
};
TsanTokens g_tsan_tokens;

#if MOE_COMM_SIMT_TSAN
// Not in the installed headers: the calls a Java VM makes when it allocates and frees heap objects. Together
// they drop a range's access history and sync objects, which is what a block's new shared memory needs
// (GCC 12's AnnotateNewMemory does nothing).
extern "C" void __tsan_java_alloc(unsigned long ptr, unsigned long size);
extern "C" void __tsan_java_free(unsigned long ptr, unsigned long size);

std::vector<void*> g_tsan_fibers[kPools];  // one per pool and thread index, reused by the pool's blocks

void* tsan_current() { return __tsan_get_current_fiber(); }
// Thread `i`'s TSan fiber in `pool`, named after the CUDA thread it runs now (a report names an earlier access's
// fiber by the block it runs at the time of the report).
void* tsan_fiber_for(int pool, size_t i, const ThreadId& id) {
  std::vector<void*>& fibers = g_tsan_fibers[pool];
  while (fibers.size() <= i) fibers.push_back(__tsan_create_fiber(0));
  const std::string name = "CUDA thread " + std::to_string(id.thread_idx.x) + " of block " + std::to_string(id.block_idx.x);
  __tsan_set_fiber_name(fibers[i], name.c_str());
  return fibers[i];
}
void tsan_switch(void* fiber) { __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync); }
void tsan_release(void* token) { __tsan_release(token); }
void tsan_acquire(void* token) { __tsan_acquire(token); }
void tsan_new_memory(void* p, size_t bytes) {
  if (bytes == 0) return;
  __tsan_java_free(reinterpret_cast<unsigned long>(p), bytes);
  __tsan_java_alloc(reinterpret_cast<unsigned long>(p), bytes);
}
#else
void* tsan_current() { return nullptr; }
void* tsan_fiber_for(int, size_t, const ThreadId&) { return nullptr; }
void tsan_switch(void*) {}
void tsan_release(void*) {}
void tsan_acquire(void*) {}
void tsan_new_memory(void*, size_t) {}
#endif

std::vector<uint8_t*> g_stacks[kPools];  // per pool and thread index, reused across launches

uint8_t* stack_for(int pool, size_t i) {
  std::vector<uint8_t*>& stacks = g_stacks[pool];
  while (stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
    stacks.push_back(static_cast<uint8_t*>(p));
  }
  return stacks[i];
}

#if defined(__x86_64__)
// Saves the callee-saved registers and the stack pointer of the running context in *from, resumes `to`.
extern "C" void simt_switch_context(void** from, void* to);
asm(R"(
.text
.globl simt_switch_context
.hidden simt_switch_context
.type simt_switch_context,@function
simt_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size simt_switch_context, .-simt_switch_context
)");
#endif

void to_scheduler() {
  Fiber* f = g_launch.running;
  tsan_switch(g_launch.tsan_scheduler);
#if defined(__x86_64__)
  simt_switch_context(&f->sp, g_launch.scheduler_sp);
#else
  swapcontext(&f->context, &g_launch.scheduler);
#endif
}

void run_fiber(Fiber* f) {
  g_launch.running = f;
  tsan_switch(f->tsan_fiber);
#if defined(__x86_64__)
  simt_switch_context(&g_launch.scheduler_sp, f->sp);
#else
  swapcontext(&g_launch.scheduler, &f->context);
#endif
  g_launch.running = nullptr;
}

[[noreturn]] void fiber_main() {
  tsan_acquire(&g_tsan_tokens.block_start);
  (*g_launch.body)();
  tsan_release(&g_tsan_tokens.launch_end);
  g_launch.running->state = State::kExited;
  to_scheduler();
  __builtin_unreachable();  // an exited fiber is never resumed
}

void start_fiber(Fiber* f, uint8_t* stack) {
  f->stack = stack;
#if defined(__x86_64__)
  // The frame simt_switch_context pops: six registers, then fiber_main as the return address, placed so that
  // fiber_main starts with the stack aligned as after a call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
  void** frame = reinterpret_cast<void**>(top - 16);
  frame[0] = reinterpret_cast<void*>(&fiber_main);
  for (int i = 1; i <= 6; ++i) frame[-i] = nullptr;
  f->sp = frame - 6;
#else
  getcontext(&f->context);
  f->context.uc_stack.ss_sp = stack;
  f->context.uc_stack.ss_size = kStackBytes;
  f->context.uc_link = nullptr;
  makecontext(&f->context, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
}

// What a thread does, for error messages: "has returned", "waits at __syncthreads (file:line)", ... (`plural`:
// "have returned", "wait at ...", for a group of lanes).
std::string doing(const Fiber& f, bool plural) {
  const std::string site = f.file == nullptr ? "" : " (" + std::string(f.file) + ":" + std::to_string(f.line) + ")";
  switch (f.state) {
    case State::kExited: return plural ? "have returned" : "has returned";
    case State::kRunnable: return plural ? "are running" : "is running";
    case State::kAtBarrier: return (plural ? "wait" : "waits") + std::string(" at __syncthreads") + site;
    case State::kAtWarpOp: break;
  }
  return (plural ? "wait" : "waits") + std::string(" at a warp collective") + site;
}

std::string where(const Fiber& f) {
  return "thread " + std::to_string(f.id.thread_idx.x) + " of block " + std::to_string(f.id.block_idx.x) + " " +
         doing(f, false);
}

void fail(const std::string& what) {
  if (g_launch.error.empty()) g_launch.error = what;
}

// Completes warp collectives every lane has reached. A warp is stuck when some lanes wait at a collective and
// the others cannot join it (returned, or at a barrier); that is reported once nothing else can run.
void complete_warp_ops() {
  const int n = int(g_launch.fibers.size());
  for (int base = 0; base < n; base += kWarpSize) {
    Fiber* lanes = &g_launch.fibers[base];
    bool all = true;
    for (int l = 0; l < kWarpSize && all; ++l) all = lanes[l].state == State::kAtWarpOp;
    if (!all) continue;
    const Fiber& first = lanes[0];
    for (int l = 1; l < kWarpSize; ++l) {
      const Fiber& f = lanes[l];
      if (f.line != first.line || std::strcmp(f.file, first.file) != 0 || f.op != first.op || f.mask != first.mask ||
          f.width != first.width) {
        fail("divergent warp collective: " + where(first) + ", " + where(f));
        return;
      }
    }
    if (first.mask != 0xffffffffu) {
      fail("warp collective with mask other than 0xffffffff (not modelled): " + where(first));
      return;
    }
    const int width = first.width;
    if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) {
      fail("warp collective width must be a power of two <= 32: " + where(first));
      return;
    }
    uint64_t ballot = 0;
    for (int l = 0; l < kWarpSize; ++l) ballot |= (lanes[l].value != 0 ? 1ull : 0ull) << l;
    for (int l = 0; l < kWarpSize; ++l) {
      Fiber& f = lanes[l];
      const int segment = l & ~(width - 1);
      switch (f.op) {
        case WarpOp::kShuffle: {
          const int src = segment + (((f.arg % width) + width) % width);
          f.result = lanes[src].value;
          break;
        }
        case WarpOp::kShuffleXor: {
          const int src = l ^ f.arg;
          f.result = (src >= segment && src < segment + width) ? lanes[src].value : f.value;
          break;
        }
        case WarpOp::kBallot: f.result = ballot; break;
        case WarpOp::kSync: f.result = 0; break;
      }
    }
    if (first.op == WarpOp::kSync) ++g_launch.syncwarps_done[base / kWarpSize];
    for (int l = 0; l < kWarpSize; ++l) lanes[l].state = State::kRunnable;
  }
}

// Completes the block barrier when every thread is at it (the same one).
void complete_barrier() {
  const Fiber* first = nullptr;
  for (const Fiber& f : g_launch.fibers) {
    if (f.state != State::kAtBarrier) {
      if (f.state == State::kExited) continue;
      return;  // someone is still running or at a warp collective
    }
    if (first == nullptr) first = &f;
  }
  if (first == nullptr) return;
  uint64_t all = 1;
  for (const Fiber& f : g_launch.fibers) {
    if (f.state == State::kExited) {
      fail("__syncthreads reached after threads returned: " + where(*first) + ", " + where(f));
      return;
    }
    if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
      fail("divergent __syncthreads: " + where(*first) + ", " + where(f));
      return;
    }
    all &= f.value != 0 ? 1 : 0;
  }
  for (Fiber& f : g_launch.fibers) {
    f.result = all;
    f.state = State::kRunnable;
  }
  ++g_launch.barriers_done;
}

// The first warp some of whose lanes wait at a warp collective (else warp 0), its lanes grouped by what they
// do, e.g. "warp 0 of block 0: lanes 0-15 wait at a warp collective (low_latency.cu:150); lanes 16-31 have
// returned".
std::string stuck_warp() {
  const int n = int(g_launch.fibers.size());
  int base = 0;
  for (int b = 0; b < n; b += kWarpSize) {
    bool waiting = false;
    for (int l = 0; l < kWarpSize; ++l) waiting |= g_launch.fibers[b + l].state == State::kAtWarpOp;
    if (waiting) {
      base = b;
      break;
    }
  }
  std::string out = "warp " + std::to_string(base / kWarpSize) + " of block " +
                    std::to_string(g_launch.fibers[base].id.block_idx.x) + ":";
  for (int l = 0; l < kWarpSize;) {
    const std::string w = doing(g_launch.fibers[base + l], true);
    int end = l + 1;
    while (end < kWarpSize && doing(g_launch.fibers[base + end], true) == w) ++end;
    out += (l == 0 ? " lanes " : "; lanes ") + std::to_string(l) + "-" + std::to_string(end - 1) + " " + w;
    l = end;
  }
  return out;
}

std::vector<int> pass_order(int n) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  if (g_order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (g_order == Order::kShuffled) std::shuffle(order.begin(), order.end(), g_rng);
  return order;
}

// Runs the block's fibers until every one has returned or the launch has failed.
void run_block_fibers() {
  const int n = int(g_launch.fibers.size());
  while (g_launch.error.empty()) {
    bool ran = false, only_spins = true;
    for (int i : pass_order(n)) {
      Fiber& f = g_launch.fibers[i];
      if (f.state != State::kRunnable) continue;
      f.spun = false;
      run_fiber(&f);
      ran = true;
      only_spins &= f.spun;
      if (!g_launch.error.empty()) return;
    }
    complete_warp_ops();
    complete_barrier();
    if (!g_launch.error.empty()) return;
    bool any_runnable = false, all_exited = true;
    for (const Fiber& f : g_launch.fibers) {
      any_runnable |= f.state == State::kRunnable;
      all_exited &= f.state == State::kExited;
    }
    if (all_exited) return;
    if (!any_runnable) {
      fail("deadlock in a block (threads wait at collectives they cannot complete): " + stuck_warp());
      return;
    }
    if (ran && only_spins) sched_yield();  // every thread polls memory another process writes: let it run
  }
}

// Fills a block's shared memory with 0xA5, new to TSan. The fill is a memset, which TSan sees wherever it is
// called from: the history is dropped first, so that it does not race the previous block's accesses, and again
// after it, so that the block's threads do not race it.
void fill_with_garbage(uint8_t* p, size_t bytes) {
  tsan_new_memory(p, bytes);
  std::fill(p, p + bytes, uint8_t(0xA5));
  tsan_new_memory(p, bytes);
}

// Runs block `block_idx` of the launch on `pool`'s fibers: its threads start as fibers, with its shared memory
// filled with garbage.
void run_block(uint3 block_idx, int pool) {
  const int n = int(g_launch.block.x * g_launch.block.y * g_launch.block.z);
  g_launch.fibers.assign(n, Fiber{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_launch.fibers[i];
    f.id.thread_idx = make_uint3(i % g_launch.block.x, (i / g_launch.block.x) % g_launch.block.y,
                                 i / (g_launch.block.x * g_launch.block.y));
    f.id.block_idx = block_idx;
    f.tsan_fiber = tsan_fiber_for(pool, size_t(i), f.id);
    start_fiber(&f, stack_for(pool, size_t(i)));
  }
  g_launch.pool = pool;
  g_launch.barriers_done = 0;
  g_launch.syncwarps_done.assign(size_t(n / kWarpSize), 0);
  fill_with_garbage(g_launch.smem.data(), g_launch.smem.size());
  fill_with_garbage(__start_simt_shared, size_t(__stop_simt_shared - __start_simt_shared));
  tsan_release(&g_tsan_tokens.block_start);  // orders the scheduler's set-up (the fibers' allocation) before them
  run_block_fibers();
}

}  // namespace

const ThreadId& current() {
  if (g_launch.running == nullptr) throw std::logic_error("simt: a device function ran outside a launch");
  return g_launch.running->id;
}
const dim3& block_dim() { return g_launch.block; }
const dim3& grid_dim() { return g_launch.grid; }

void configure(Order order, uint64_t seed) {
  g_order = order;
  g_rng.seed(seed);
}

uint64_t launches_completed() { return g_shapes.size(); }
const std::vector<LaunchShape>& launch_shapes() { return g_shapes; }

std::string launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  if (g_launch.body != nullptr) return "simt: a launch inside a launch";
  const size_t threads = size_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || threads % kWarpSize != 0)
    return "simt: blocks of " + std::to_string(threads) + " threads (need a multiple of 32, at most 1024)";
  if (grid.x == 0 || grid.y != 1 || grid.z != 1) return "simt: grids must be one-dimensional and non-empty";
  g_launch.grid = grid;
  g_launch.block = block;
  g_launch.body = &body;
  g_launch.tsan_scheduler = tsan_current();
  g_launch.smem.assign(smem_bytes, 0);
  g_launch.error.clear();
  int position = 0;
  for (int b : pass_order(int(grid.x))) {
    run_block(make_uint3(b, 0, 0), position++ % kPools);
    if (!g_launch.error.empty()) break;
  }
  tsan_acquire(&g_tsan_tokens.launch_end);
  g_launch.body = nullptr;
  g_launch.fibers.clear();
  g_shapes.push_back({grid.x, unsigned(threads), smem_bytes});
  return g_launch.error;
}

void barrier(const char* file, int line) { barrier_and(1, file, line); }

namespace {
// What the running fiber, arriving at a barrier or a collective, releases into and then acquires from once the
// scheduler has completed it; null for the collectives that order no memory (shuffles, ballots). The parity of
// the completed count keeps a thread already at the next barrier from releasing into the token the last ones
// still acquire from this one.
void* tsan_token_of(State state, WarpOp op) {
  if (state == State::kAtBarrier) return &g_tsan_tokens.barrier[g_launch.pool][g_launch.barriers_done & 1];
  if (op != WarpOp::kSync) return nullptr;
  const size_t warp = size_t(g_launch.running - g_launch.fibers.data()) / kWarpSize;
  return &g_tsan_tokens.syncwarp[g_launch.pool][warp][g_launch.syncwarps_done[warp] & 1];
}

// The running fiber waits at a barrier or collective (its operands set) until the scheduler completes it.
uint64_t wait_at(State state, uint64_t value, const char* file, int line) {
  Fiber* f = g_launch.running;
  f->state = state;
  f->value = value;
  f->file = file;
  f->line = line;
  void* token = tsan_token_of(state, f->op);
  if (token != nullptr) tsan_release(token);
  to_scheduler();
  if (token != nullptr) tsan_acquire(token);
  return f->result;
}
}  // namespace

int barrier_and(int predicate, const char* file, int line) {
  return int(wait_at(State::kAtBarrier, predicate != 0, file, line));
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
  Fiber* f = g_launch.running;
  f->op = op;
  f->mask = mask;
  f->arg = arg;
  f->width = width;
  return wait_at(State::kAtWarpOp, value, file, line);
}

void spin_point() {
  Fiber* f = g_launch.running;
  if (f == nullptr) return;
  f->spun = true;
  to_scheduler();
}

void* dynamic_shared() { return g_launch.smem.data(); }

}  // namespace simt
