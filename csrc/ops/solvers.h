// ops/solvers.h -- the body of the solvers family (ops/solvers.cpp): solver_update, the one fused step of every
// multistep sampler of ddpm_fast/solvers/steps.py (DPM-Solver++ orders 1-3 ODE / SDE, Euler with churn, Euler
// ancestral, UniPC corrector + predictor). Each of them is a linear combination, with per-sample coefficients,
// of x, the (guided) model output, up to three history entries, UniPC's last_sample and one normal noise draw;
// the coefficients are one row of a small [R, kNumSolverCols] table (ddpm_fast/solvers/tables.py), picked per
// sample by row_index. The contract: /work/notes/solver_op_spec.md; the result: reference.solver_update.
#pragma once

#include "body.h"

namespace ddpm {

// The columns of a solver_update row (ddpm_fast/solvers/tables.py FUSED_COLUMNS, in this order)
enum SolverCol : int {
  kChurn = 0,       // x_s = x + churn noise
  kConvSample = 1,  // m = conv_sample x_s + conv_model g
  kConvModel = 2,
  kCThis = 3,       // corrected = c_this x_s + c_last last + c_model m + c_h1 h1 + c_h2 h2 + c_h3 h3
  kCLast = 4,
  kCModel = 5,
  kCH1 = 6,
  kCH2 = 7,
  kCH3 = 8,
  kPCorr = 9,       // x_prev = p_corr corrected + p_m0 m + p_h1 h1 + p_h2 h2 + p_noise noise
  kPM0 = 10,
  kPH1 = 11,
  kPH2 = 12,
  kPNoise = 13,
  kNumSolverCols = 14
};
// the CUDA driver stages a row in kNumCols shared-memory slots
static_assert(kNumSolverCols <= kNumCols, "a solver row must fit the CUDA driver's shared table row");

// One sampler step on one element. Inputs (dtype S unless said): x (x's dtype), the model output's
// unconditional half u and conditional half c (x's dtype or S; c absent without guidance), the history
// h1..h3 (outputs m of steps i-1, i-2, i-3), last (UniPC's last_sample), noise (given, or drawn in-kernel);
// an absent input reads as 0. Outputs: x_prev (x's dtype), m (the converted model output: x0 or eps, into
// the caller's m_out) and corrected (into last_sample, in place). Every input of an element is read before
// any of its outputs is written (m_out may be h3's memory, last_sample is both), as both drivers do.
template <class S> struct SolverUpdateElem {
  struct Options {
    S guidance_scale = S(1);
    bool has_cond = false;           // model_cond given: classifier-free guidance of u towards c
    const S* cfg_factor = nullptr;   // [B] guidance_rescale factor of g, or nullptr
    const S* thresh = nullptr;       // [B] dynamic-threshold scale of m, or nullptr
  };
  // noise first: a CUDA thread draws its noise before it loads the other inputs (fewer values live at once)
  enum In : int { in_noise, in_x, in_uncond, in_cond, in_h1, in_h2, in_h3, in_last, kNumIn };
  enum Out : int { out_x_prev, out_m, out_corrected, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  static constexpr bool kMayDrawNoise = true;  // its noise input may be drawn in-kernel (Philox)
  // CUDA: 8 float32 inputs of 8 elements a thread already take 64 registers, the body ~111 (117 with noise):
  // at 80 registers (3 blocks / SM) ptxas spills, so this body asks for 2 blocks / SM (25% occupancy, no
  // spills; tests/test_cuda_compile.py names it as the one exception). The coefficients are read from the row
  // where the driver staged it (shared memory), not copied to registers.
  static constexpr int kMinBlocksPerSm = 2;
  const S* coef;  // this sample's row [kNumSolverCols] (CUDA: the block's shared copy; CPU: the table's row)
  S guidance_scale, cfg_factor, thresh_scale;
  bool has_cond, has_cfg_factor, has_thresh;

  static DDPM_HD SolverUpdateElem make(const S* row, const Options& options, int64_t b, int64_t) {
    SolverUpdateElem e;
    e.coef = row;
    e.guidance_scale = options.guidance_scale;
    e.has_cond = options.has_cond;
    e.has_cfg_factor = options.cfg_factor != nullptr;
    e.cfg_factor = options.cfg_factor ? options.cfg_factor[b] : S(1);
    e.has_thresh = options.thresh != nullptr;
    e.thresh_scale = options.thresh ? options.thresh[b] : S(1);
    return e;
  }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    const V noise = in[in_noise], h1 = in[in_h1], h2 = in[in_h2];
    const V x_s = in[in_x] + V(coef[kChurn]) * noise;
    V guided = has_cond ? guided_output(in[in_uncond], in[in_cond], V(guidance_scale)) : in[in_uncond];
    if (has_cfg_factor) guided = guided * V(cfg_factor);
    V m = V(coef[kConvSample]) * x_s + V(coef[kConvModel]) * guided;
    if (has_thresh) m = process_xstart(m, false, true, V(thresh_scale));
    const V corrected = V(coef[kCThis]) * x_s + V(coef[kCLast]) * in[in_last] + V(coef[kCModel]) * m +
                        V(coef[kCH1]) * h1 + V(coef[kCH2]) * h2 + V(coef[kCH3]) * in[in_h3];
    out[out_x_prev] = V(coef[kPCorr]) * corrected + V(coef[kPM0]) * m + V(coef[kPH1]) * h1 + V(coef[kPH2]) * h2 +
                      V(coef[kPNoise]) * noise;
    out[out_m] = m;
    out[out_corrected] = corrected;
  }
};
DDPM_BODY(SolverUpdateElem)

}  // namespace ddpm
