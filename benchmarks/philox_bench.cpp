// philox_bench.cpp -- single-core cost of the CPU kernels' in-kernel noise: Philox-4x32-10 + Box-Muller
// (philox_normal_rows of csrc/cpu/simd_philox.h, the draw of a seeded p_sample_step / ddim_step), in ns per
// normal, for the CPU driver's chunk size, the rows held in L1. Build and run from the repository root:
//
//   TI=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -O3 -std=c++20 $(python -c "import ddpm_fast._build as b; print(' '.join(b.cpu_flags()))") \
//       -Icsrc -I$TI/include -I$TI/include/torch/csrc/api/include benchmarks/philox_bench.cpp \
//       -L$TI/lib -ltorch_cpu -lc10 -Wl,-rpath,$TI/lib -o /tmp/philox_bench && /tmp/philox_bench
#include "cpu/simd_philox.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

int main() {
  constexpr int64_t n = 2048;  // csrc/cpu/kernels.cpp's kChunk
  constexpr int reps = 20000;
  alignas(64) static float z[n];
  double checksum = 0;
  std::vector<double> ns;
  for (int round = 0; round < 7; ++round) {
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) {
      ddpm::philox_normal_rows(1234, uint64_t(r) * n, n, z);
      checksum += z[r % n];
    }
    auto t1 = std::chrono::steady_clock::now();
    ns.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / (double(n) * reps));
  }
  std::sort(ns.begin(), ns.end());
  std::printf("Philox-4x32-10 + Box-Muller: %.3f ns per normal on one core (median of 7 rounds of %d x %lld; checksum %g)\n",
              ns[ns.size() / 2], reps, static_cast<long long>(n), checksum);
}
