// cuda/emu/cuda_emu.h -- the CUDA execution model on the CPU, so that cuda/kernels.cu runs as host C++
// (backend "cuda_emu", built by ddpm_fast._build with -DDDPM_CUDA_EMU; see cuda/runtime.h).
//
// What it models:
//   - a launch: grid and block as dim3 (x, y, z), checked like the CUDA runtime (block <= 1024 threads,
//     block.z <= 64, grid.y / grid.z <= 65535, no zero dims); gridDim / blockDim / blockIdx / threadIdx.
//   - a block: blockDim CUDA threads, each a fiber (its own stack and registers, ucontext) on the
//     launching OS thread. A fiber runs until it reaches a barrier or exits, then the next one runs, so a
//     thread never sees another's writes made after their last common barrier was passed out of order:
//     a missing __syncthreads shows up as a read of stale data. Blocks of a grid run one after another;
//     launches are serialised (one emulated device, one stream, synchronous).
//   - __syncthreads: a barrier over the block's threads that have not exited (sm_70+ semantics); threads
//     waiting at barriers that can never all be reached (divergent __syncthreads) are reported as an error.
//   - __shared__: one copy per kernel instantiation (static storage); safe because one block runs at a
//     time. Not re-poisoned between blocks: a read of shared memory no thread of the block wrote gives the
//     previous block's value, not garbage.
//   - __shfl_down_sync over 32-lane warps (the last warp may be partial): every live lane of the warp must
//     call it (as with a full mask); a lane whose source lies past the warp keeps its own value.
//   - CUDA_KERNEL_ASSERT: the failing thread leaves the kernel at once (as a trap would, no unwinding) and the launch check
//     raises "device-side assert triggered" with the condition, block, thread, file and line -- a Python
//     RuntimeError. Unlike a GPU context, the emulated device is usable again afterwards.
//   - AddressSanitizer: fiber stack switches are annotated, so ASan builds check kernel code too.
// What it does not model: parallel execution and the memory model of a GPU (weak ordering, caches;
// ThreadSanitizer sees nothing here), warp-synchronous code without the *_sync intrinsics, other
// intrinsics (atomics, ballot, __shfl_sync/_up/_xor, __ldg, fast math like __expf), dynamic shared memory,
// streams/events/async copies, cooperative groups, timing. It proves the code paths (launch geometry,
// indexing, reductions, barriers, operand plumbing), not speed.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;  // of the running fiber (set by the scheduler)
inline dim3 blockDim, gridDim;                 // of the running launch (launches are serialised)

namespace ddpm_emu {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxBlockThreads = 1024;

struct Stream {};  // the one emulated stream (launches are synchronous)

// Where a fiber waits: nowhere (runnable), at the block barrier, or at its warp's barrier.
enum class Wait : uint8_t { kNone, kBlock, kWarp, kDone };

// The running block: one fiber per CUDA thread, the barrier bookkeeping, the warp-shuffle exchange slots.
struct Block {
  unsigned threads = 0;
  std::vector<ucontext_t> ctx;
  std::vector<Wait> wait;
  std::vector<unsigned> warp_live;         // threads of each warp that have not exited
  std::vector<unsigned> warp_waiting;      // ... of which wait at the warp barrier
  unsigned live = 0, block_waiting = 0;    // the same for the block barrier
  std::vector<uint64_t> lanes;             // one 8-byte shuffle slot per thread
  unsigned current = 0;                    // the running fiber
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  dim3 block_idx;
};

inline thread_local Block* t_block = nullptr;

// First device-side error of the running launch (empty: none), reported by launch_check().
inline std::mutex g_error_mutex;
inline std::string g_error;

inline void record_error(const std::string& what) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  if (g_error.empty()) g_error = what;
}

[[noreturn]] void exit_fiber();

// The failing thread records the error and leaves the kernel at once, as a trap would: no unwinding
// (kernel locals are trivially destructible; an exception thrown on a fiber stack also upsets ASan).
[[noreturn]] inline void device_assert(const char* cond, const char* file, int line) {
  record_error(std::string(file) + ":" + std::to_string(line) + ": block (" + std::to_string(blockIdx.x) + "," +
               std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + "), thread (" +
               std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) + "," +
               std::to_string(threadIdx.z) + "): Assertion `" + cond + "` failed.");
  exit_fiber();
}

// Raises the launch's device-side error, if any, and clears it.
inline void launch_check() {
  std::string err;
  {
    std::lock_guard<std::mutex> lock(g_error_mutex);
    err.swap(g_error);
  }
  TORCH_CHECK(err.empty(), "CUDA error (emulated): device-side assert triggered: ", err);
}

inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

// Fiber stacks, reused across blocks and launches (guarded by g_launch_mutex).
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kStackBytes = 256 * 1024;  // ASan's redzones and -O1 frames
#else
constexpr size_t kStackBytes = 64 * 1024;
#endif
inline std::vector<std::unique_ptr<char[]>> g_stacks;

inline void set_thread_idx(unsigned i) {
  threadIdx = dim3(i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y));
}

// swapcontext with AddressSanitizer told which stack runs next (plain swapcontext without ASan).
#if defined(__SANITIZE_ADDRESS__)
inline thread_local const void* t_scheduler_stack = nullptr;
inline thread_local size_t t_scheduler_stack_size = 0;
inline thread_local bool t_from_scheduler = false;
inline void switch_context(ucontext_t* from, ucontext_t* to, const void* to_stack, size_t to_size, bool exiting) {
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake_stack, to_stack, to_size);
  swapcontext(from, to);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
}
inline void fiber_started() {  // first thing a fiber runs; entered from the scheduler: learn its stack
  const void* old_stack = nullptr;
  size_t old_size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &old_stack, &old_size);
  if (t_from_scheduler) t_scheduler_stack = old_stack, t_scheduler_stack_size = old_size;
}
inline void switch_fibers(Block* blk, unsigned from, unsigned to, bool exiting) {
  t_from_scheduler = false;
  switch_context(&blk->ctx[from], &blk->ctx[to], g_stacks[to].get(), kStackBytes, exiting);
}
inline void to_scheduler(Block* blk, unsigned from, bool exiting) {
  switch_context(&blk->ctx[from], &blk->scheduler, t_scheduler_stack, t_scheduler_stack_size, exiting);
}
inline void to_fiber(Block* blk, unsigned i) {
  t_from_scheduler = true;
  switch_context(&blk->scheduler, &blk->ctx[i], g_stacks[i].get(), kStackBytes, false);
}
#else
inline void fiber_started() {}
inline void switch_fibers(Block* blk, unsigned from, unsigned to, bool) { swapcontext(&blk->ctx[from], &blk->ctx[to]); }
inline void to_scheduler(Block* blk, unsigned from, bool) { swapcontext(&blk->ctx[from], &blk->scheduler); }
inline void to_fiber(Block* blk, unsigned i) { swapcontext(&blk->scheduler, &blk->ctx[i]); }
#endif

// Leaves the running fiber (waiting or exited) for the next runnable one of this sweep, else for the
// scheduler; returns when the fiber is resumed.
inline void yield_fiber(Block* blk, bool exiting) {
  const unsigned i = blk->current;
  unsigned j = i + 1;
  while (j < blk->threads && blk->wait[j] != Wait::kNone) ++j;
  if (j < blk->threads) {
    blk->current = j;
    set_thread_idx(j);
    switch_fibers(blk, i, j, exiting);
  } else {
    to_scheduler(blk, i, exiting);
  }
}

// The running thread exits: it takes no further part in barriers or shuffles (sm_70+).
[[noreturn]] inline void exit_fiber() {
  Block* blk = t_block;
  const unsigned i = blk->current;
  blk->wait[i] = Wait::kDone;
  --blk->live;
  --blk->warp_live[i / kWarpSize];
  yield_fiber(blk, /*exiting=*/true);
  __builtin_unreachable();
}

inline void fiber_main() {
  fiber_started();
  try {
    (*t_block->body)();
  } catch (const std::exception& e) {
    record_error(std::string("exception in an emulated thread: ") + e.what());
  } catch (...) {
    record_error("unknown exception in an emulated thread");
  }
  exit_fiber();
}

// The calling fiber waits at the block (kBlock) or its warp's (kWarp) barrier until every live thread of
// the block / warp is there.
inline void wait_at(Wait where) {
  Block* blk = t_block;
  TORCH_INTERNAL_ASSERT(blk, "a barrier outside an emulated kernel");
  const unsigned i = blk->current;
  blk->wait[i] = where;
  if (where == Wait::kBlock) ++blk->block_waiting;
  else ++blk->warp_waiting[i / kWarpSize];
  yield_fiber(blk, false);
}

// Runs every fiber of the block until all have exited, releasing barriers as they fill.
inline void run_block(Block& blk) {
  const unsigned n = blk.threads;
  const unsigned nwarps = (n + kWarpSize - 1) / kWarpSize;
  for (;;) {
    // one sweep: each runnable fiber in order runs until it waits or exits, then hands over to the next
    unsigned first = 0;
    while (first < n && blk.wait[first] != Wait::kNone) ++first;
    const bool ran = first < n;
    if (ran) {
      blk.current = first;
      set_thread_idx(first);
      to_fiber(&blk, first);
    }
    if (blk.live == 0) return;
    bool released = false;
    for (unsigned w = 0; w < nwarps; ++w) {
      if (blk.warp_live[w] > 0 && blk.warp_waiting[w] == blk.warp_live[w]) {
        for (unsigned i = w * kWarpSize; i < std::min(n, (w + 1) * kWarpSize); ++i)
          if (blk.wait[i] == Wait::kWarp) blk.wait[i] = Wait::kNone;
        blk.warp_waiting[w] = 0;
        released = true;
      }
    }
    if (blk.block_waiting == blk.live) {
      for (unsigned i = 0; i < n; ++i)
        if (blk.wait[i] == Wait::kBlock) blk.wait[i] = Wait::kNone;
      blk.block_waiting = 0;
      released = true;
    }
    if (!ran && !released) {
      record_error("block (" + std::to_string(blk.block_idx.x) + "," + std::to_string(blk.block_idx.y) + "," +
                   std::to_string(blk.block_idx.z) + "): deadlock: " + std::to_string(blk.block_waiting) +
                   " of " + std::to_string(blk.live) + " live threads wait at __syncthreads, the others at a "
                   "warp shuffle (divergent barrier)");
      return;  // the waiting fibers are abandoned (their stacks are reused; nothing on them is destroyed)
    }
  }
}

inline std::mutex g_launch_mutex;  // one emulated device: launches run one at a time

// Runs body() as every thread of every block of a <<<grid, block, smem>>> launch, then returns
// (synchronous). Device-side asserts are reported by launch_check().
template <class Body> void launch(dim3 grid, dim3 block, size_t dynamic_smem, const Body& body) {
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535,
              "CUDA error (emulated): invalid configuration argument: grid ", grid.x, "x", grid.y, "x", grid.z);
  const uint64_t n64 = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(n64 >= 1 && n64 <= kMaxBlockThreads && block.z <= 64,
              "CUDA error (emulated): invalid configuration argument: block ", block.x, "x", block.y, "x", block.z);
  TORCH_CHECK(dynamic_smem == 0, "CUDA error (emulated): dynamic shared memory is not emulated");
  const unsigned n = static_cast<unsigned>(n64);
  std::lock_guard<std::mutex> serial(g_launch_mutex);
  while (g_stacks.size() < n) g_stacks.push_back(std::make_unique<char[]>(kStackBytes));
  gridDim = grid;
  blockDim = block;
  const std::function<void()> fn = [&] { body(); };
  Block blk;
  blk.threads = n;
  blk.ctx.resize(n);
  blk.wait.resize(n);
  blk.lanes.assign(n, 0);
  blk.body = &fn;
  t_block = &blk;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        blk.block_idx = blockIdx;
        blk.live = n;
        blk.block_waiting = 0;
        blk.warp_live.assign((n + kWarpSize - 1) / kWarpSize, 0);
        blk.warp_waiting.assign(blk.warp_live.size(), 0);
        for (unsigned i = 0; i < n; ++i) {
          ++blk.warp_live[i / kWarpSize];
          blk.wait[i] = Wait::kNone;
#if defined(__SANITIZE_ADDRESS__)
          // a stack reused after an abandoned block may hold poisoned frames that never returned
          __asan_unpoison_memory_region(g_stacks[i].get(), kStackBytes);
#endif
          getcontext(&blk.ctx[i]);
          blk.ctx[i].uc_stack.ss_sp = g_stacks[i].get();
          blk.ctx[i].uc_stack.ss_size = kStackBytes;
          blk.ctx[i].uc_link = nullptr;
          makecontext(&blk.ctx[i], &fiber_main, 0);
        }
        run_block(blk);
      }
  t_block = nullptr;
}

}  // namespace ddpm_emu

inline void __syncthreads() { ddpm_emu::wait_at(ddpm_emu::Wait::kBlock); }

// Value of lane (lane + delta) of the calling warp; every live lane of the warp must call it.
template <class T> T __shfl_down_sync(unsigned /*mask*/, T value, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a 1-8 byte value");
  ddpm_emu::Block* blk = ddpm_emu::t_block;
  TORCH_INTERNAL_ASSERT(blk, "__shfl_down_sync outside an emulated kernel");
  const unsigned i = ddpm_emu::linear_tid(), warp = i / ddpm_emu::kWarpSize, lane = i % ddpm_emu::kWarpSize;
  const unsigned width = std::min(ddpm_emu::kWarpSize, blk->threads - warp * ddpm_emu::kWarpSize);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  blk->lanes[i] = bits;
  ddpm_emu::wait_at(ddpm_emu::Wait::kWarp);  // every lane has published its value
  T result = value;
  if (lane + delta < width) std::memcpy(&result, &blk->lanes[i + delta], sizeof(T));
  ddpm_emu::wait_at(ddpm_emu::Wait::kWarp);  // every lane has read before the slots are reused
  return result;
}

using std::max;
using std::min;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) ::ddpm_emu::device_assert(#cond, __FILE__, __LINE__)
