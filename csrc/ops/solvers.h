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
// an absent input's terms are left out (as the reference's), Options::inputs says which are present.
// Outputs: x_prev (x's dtype), m (the converted model output: x0 or eps, into the caller's m_out) and
// corrected (into last_sample, in place). Every input of an element is read before any of its outputs is
// written (m_out may be h3's memory, last_sample is both), as both drivers do.
template <class S> struct SolverUpdateElem {
  // the optional inputs a launch has (Options::inputs)
  enum Has : unsigned { kHasCond = 1, kHasNoise = 2, kHasH1 = 4, kHasH2 = 8, kHasH3 = 16, kHasLast = 32 };
  enum Scales : unsigned { kHasCfgFactor = 64, kHasThresh = 128 };  // the per-sample factors (make sets them)
  struct Options {
    S guidance_scale = S(1);
    unsigned inputs = 0;             // the Has bits of the given inputs (kHasCond: classifier-free guidance)
    const S* cfg_factor = nullptr;   // [B] guidance_rescale factor of g, or nullptr
    const S* thresh = nullptr;       // [B] dynamic-threshold scale of m, or nullptr
  };
  // noise first: a CUDA thread draws its noise before it loads the other inputs (fewer values live at once)
  enum In : int { in_noise, in_x, in_uncond, in_cond, in_h1, in_h2, in_h3, in_last, kNumIn };
  enum Out : int { out_x_prev, out_m, out_corrected, kNumOut };
  static constexpr int NI = kNumIn, NO = kNumOut, NR = 0;
  static constexpr bool kMayDrawNoise = true;  // its noise input may be drawn in-kernel (Philox)
  // CUDA: 8 float32 inputs of 8 elements a thread already take 64 registers, the body ~110 on sm_90 (96, 106
  // with noise, on sm_80): at 80 registers (3 blocks / SM) ptxas spills, so this body asks for 2 blocks / SM
  // (25% occupancy, no spills; tests/test_cuda_compile.py names it as the one exception). The coefficients
  // are read from the row where the driver staged it (shared memory), not copied to registers.
  static constexpr int kMinBlocksPerSm = 2;
  const S* coef;  // this sample's row [kNumSolverCols] (CUDA: the block's shared copy; CPU: the table's row)
  S guidance_scale, cfg_factor, thresh_scale;
  unsigned inputs;  // Options::inputs, plus kHasCfgFactor / kHasThresh when given

  static DDPM_HD SolverUpdateElem make(const S* row, const Options& options, int64_t b, int64_t) {
    SolverUpdateElem e;
    e.coef = row;
    e.guidance_scale = options.guidance_scale;
    e.inputs = options.inputs | (options.cfg_factor ? kHasCfgFactor : 0u) | (options.thresh ? kHasThresh : 0u);
    e.cfg_factor = options.cfg_factor ? options.cfg_factor[b] : S(1);
    e.thresh_scale = options.thresh ? options.thresh[b] : S(1);
    return e;
  }
  // The CPU loop runs a copy whose inputs are a constant (the loop then loads and computes only theirs) for
  // the input sets of ddpm_fast/solvers/steps.py's samplers, each with and without guidance, without
  // guidance_rescale or thresholding: Euler (churn: + noise), Euler ancestral (noise), DPM-Solver++ 2M (h1),
  // 3M SDE (h1, h2, noise), UniPC order 3 (h1-h3, last); any other set runs with the inputs as they are.
  // The copy reads its coefficients from a local copy of the row, which the loop's stores cannot alias:
  // they stay in registers.
  template <class Run> void specialized(Run&& run) const {
    with_constant_inputs<0, kHasNoise, kHasH1, kHasH1 | kHasH2 | kHasNoise, kHasH1 | kHasH2 | kHasH3 | kHasLast>(
        run);
  }
  template <unsigned... Sets, class Run> void with_constant_inputs(Run&& run) const {
    S row[kNumSolverCols];
    for (int k = 0; k < kNumSolverCols; ++k) row[k] = coef[k];
    auto fixed = [&](unsigned set) {
      SolverUpdateElem c = *this;
      c.coef = row;
      c.inputs = set;
      return c;
    };
    const bool ran = ((inputs == Sets && (run(fixed(Sets)), true)) || ...) ||
                     ((inputs == (Sets | kHasCond) && (run(fixed(Sets | kHasCond)), true)) || ...);
    if (!ran) run(fixed(inputs));
  }
  // whether the body reads input k (the CPU loop loads only those)
  DDPM_HD bool reads(int k) const {
    constexpr unsigned kOptional[kNumIn] = {kHasNoise, 0, 0, kHasCond, kHasH1, kHasH2, kHasH3, kHasLast};
    return kOptional[k] == 0 || (inputs & kOptional[k]) != 0;
  }
  // whether the body writes output k (the CPU loop stores only those): corrected only into a given last_sample
  DDPM_HD bool writes(int k) const { return k != out_corrected || (inputs & kHasLast) != 0; }
  template <class V> DDPM_HD void operator()(const V* in, V* out, V*) const {
    V x_s = in[in_x];
    if (inputs & kHasNoise) x_s = x_s + V(coef[kChurn]) * in[in_noise];
    V guided = in[in_uncond];
    if (inputs & kHasCond) guided = guided_output(guided, in[in_cond], V(guidance_scale));
    if (inputs & kHasCfgFactor) guided = guided * V(cfg_factor);
    V m = V(coef[kConvSample]) * x_s + V(coef[kConvModel]) * guided;
    if (inputs & kHasThresh) m = process_xstart(m, false, true, V(thresh_scale));
    V corrected = V(coef[kCThis]) * x_s;
    if (inputs & kHasLast) corrected = corrected + V(coef[kCLast]) * in[in_last];
    corrected = corrected + V(coef[kCModel]) * m;
    if (inputs & kHasH1) corrected = corrected + V(coef[kCH1]) * in[in_h1];
    if (inputs & kHasH2) corrected = corrected + V(coef[kCH2]) * in[in_h2];
    if (inputs & kHasH3) corrected = corrected + V(coef[kCH3]) * in[in_h3];
    V x_prev = V(coef[kPCorr]) * corrected + V(coef[kPM0]) * m;
    if (inputs & kHasH1) x_prev = x_prev + V(coef[kPH1]) * in[in_h1];
    if (inputs & kHasH2) x_prev = x_prev + V(coef[kPH2]) * in[in_h2];
    if (inputs & kHasNoise) x_prev = x_prev + V(coef[kPNoise]) * in[in_noise];
    out[out_x_prev] = x_prev;
    out[out_m] = m;
    out[out_corrected] = corrected;
  }
};
DDPM_BODY(SolverUpdateElem)

}  // namespace ddpm
