// cuda/emu/cuda_emu.h -- the CUDA execution model on the CPU, so that cuda/kernels.cu runs as host C++
// (backend "cuda_emu", built by ddpm_fast._build with -DDDPM_CUDA_EMU; see cuda/runtime.h).
//
// What it models:
//   - a launch: grid and block as dim3 (x, y, z), checked like the CUDA runtime (block <= 1024 threads,
//     grid.y / grid.z <= 65535, no zero dims); gridDim / blockDim / blockIdx / threadIdx.
//   - a block: blockDim threads running concurrently as real OS threads (a persistent pool), so data
//     races and missing barriers show up as on a GPU (and to ThreadSanitizer); blocks of a grid run one
//     after another, launches are serialised (one emulated device, one stream, synchronous).
//   - __syncthreads: a barrier over the block's threads that have not exited (sm_70+ semantics).
//   - __shared__: one copy per kernel instantiation (static storage); safe because one block runs at
//     a time. Not re-poisoned between blocks: a read of shared memory no thread of the block wrote gives
//     the previous block's value, not garbage.
//   - __shfl_down_sync over 32-lane warps (the last warp may be partial): every live lane of the warp
//     must call it (as with a full mask); a lane whose source lies past the warp keeps its own value.
//   - CUDA_KERNEL_ASSERT: the failing thread leaves the kernel (as a trap would) and the launch check
//     raises "device-side assert triggered" with the condition, file and line -- a Python RuntimeError.
//     Unlike a GPU context, the emulated device is usable again afterwards.
// What it does not model: the memory model of a GPU (weak ordering, caches), warp-synchronous code
// without the *_sync intrinsics, other intrinsics (atomics, ballot, __shfl_sync/_up/_xor, __ldg, fast
// math like __expf), dynamic shared memory, streams/events/async copies, cooperative groups, timing.
// It proves the code paths (indexing, reductions, barriers, operand plumbing), not speed.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;  // of the calling emulated thread
inline dim3 blockDim, gridDim;                 // of the running launch (launches are serialised)

namespace ddpm_emu {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxBlockThreads = 1024;

struct Stream {};  // the one emulated stream (launches are synchronous)

// The running block: its barrier, one barrier per warp, and the warp-shuffle exchange slots.
struct Block {
  explicit Block(unsigned n) : threads(n), bar(n), lanes(n) {
    for (unsigned w = 0; w * kWarpSize < n; ++w)
      warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(kWarpSize, n - w * kWarpSize)));
  }
  unsigned threads;
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<uint64_t> lanes;  // one 8-byte slot per thread
};

inline thread_local Block* t_block = nullptr;
struct Trap {};  // unwinds the emulated thread that hit a device-side assert

// First device-side error of the running launch (empty: none), reported by launch_check().
inline std::mutex g_error_mutex;
inline std::string g_error;

inline void record_error(const std::string& what) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  if (g_error.empty()) g_error = what;
}

[[noreturn]] inline void device_assert(const char* cond, const char* file, int line) {
  record_error(std::string(file) + ":" + std::to_string(line) + ": block (" + std::to_string(blockIdx.x) + "," +
               std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + "), thread (" +
               std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) + "," +
               std::to_string(threadIdx.z) + "): Assertion `" + cond + "` failed.");
  throw Trap{};
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

// A pool of OS threads that runs one block at a time: thread i runs the kernel as linear thread id i.
class BlockPool {
 public:
  ~BlockPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
  }

  // Runs job(i) for i in [0, n) on n concurrent threads and returns when all have finished.
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    std::unique_lock<std::mutex> lock(mu_);
    while (workers_.size() < n) {
      const unsigned id = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, id] { work(id); });
    }
    job_ = &job;
    active_ = n;
    remaining_ = n;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void work(unsigned id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(unsigned)>* job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        start_.wait(lock, [&] { return stop_ || (generation_ != seen && id < active_); });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      (*job)(id);
      std::lock_guard<std::mutex> lock(mu_);
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

inline std::mutex g_launch_mutex;  // one emulated device: launches run one at a time

inline BlockPool& pool() {
  static BlockPool p;
  return p;
}

// Runs body() as every thread of every block of a <<<grid, block, smem>>> launch, then returns
// (synchronous). Device-side asserts are reported by launch_check().
template <class Body> void launch(dim3 grid, dim3 block, size_t dynamic_smem, const Body& body) {
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535,
              "CUDA error (emulated): invalid configuration argument: grid ", grid.x, "x", grid.y, "x", grid.z);
  const uint64_t n = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(n >= 1 && n <= kMaxBlockThreads && block.z <= 64,
              "CUDA error (emulated): invalid configuration argument: block ", block.x, "x", block.y, "x", block.z);
  TORCH_CHECK(dynamic_smem == 0, "CUDA error (emulated): dynamic shared memory is not emulated");
  std::lock_guard<std::mutex> serial(g_launch_mutex);
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(static_cast<unsigned>(n));
        const std::function<void(unsigned)> job = [&](unsigned i) {
          threadIdx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          blockIdx = dim3(bx, by, bz);
          t_block = &blk;
          try {
            body();
          } catch (const Trap&) {
          } catch (const std::exception& e) {
            record_error(std::string("exception in an emulated thread: ") + e.what());
          }
          t_block = nullptr;
          // an exited thread takes no further part in barriers or shuffles (sm_70+)
          blk.bar.arrive_and_drop();
          blk.warp_bar[i / kWarpSize]->arrive_and_drop();
        };
        pool().run(static_cast<unsigned>(n), job);
      }
}

}  // namespace ddpm_emu

inline void __syncthreads() {
  TORCH_INTERNAL_ASSERT(ddpm_emu::t_block, "__syncthreads outside an emulated kernel");
  ddpm_emu::t_block->bar.arrive_and_wait();
}

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
  blk->warp_bar[warp]->arrive_and_wait();  // every lane has published its value
  T result = value;
  if (lane + delta < width) std::memcpy(&result, &blk->lanes[i + delta], sizeof(T));
  blk->warp_bar[warp]->arrive_and_wait();  // every lane has read before the slots are reused
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
