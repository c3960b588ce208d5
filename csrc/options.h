// options.h -- the integer codes ddpm_fast's C++ shares with Python: the op options and the schedule table's
// columns. Each enum is a hand copy of ddpm_fast/options.py (option ids; the columns: the packed table's
// column order, ddpm_fast.schedule.COLUMNS); tests/test_options.py parses the `enum Name : int { kX = n, ... }`
// lines below and checks names and values against it, so keep that exact form with explicit values.
#pragma once

#include <cstdint>

namespace ddpm {

// mean_type: what the model's mean output predicts
enum MeanType : int { kEpsilon = 0, kX0 = 1, kXPrev = 2, kV = 3 };
// var_type: the model variance
enum VarType : int { kFixedSmall = 0, kFixedLarge = 1, kLearned = 2, kLearnedRange = 3 };
// loss_type of training_losses
enum LossType : int { kMse = 0, kRescaledMse = 1, kKl = 2, kRescaledKl = 3 };
// weighting of the MSE term
enum Weighting : int { kSimple = 0, kElbo = 1, kMinSnr = 2 };

// the columns of the schedule's packed table [T, kNumCols] (abar = alphas_cumprod; "Post" = posterior)
enum Col : int {
  kBetas = 0,
  kLogBetas = 1,
  kAlphasCumprod = 2,
  kAlphasCumprodPrev = 3,
  kSqrtAbar = 4,
  kSqrt1mAbar = 5,
  kSqrtRecipAbar = 6,
  kSqrtRecipm1Abar = 7,
  kPostVar = 8,
  kPostLogVarClipped = 9,
  kPostC1 = 10,
  kPostC2 = 11,
  kFixedLargeVar = 12,
  kFixedLargeLogVar = 13,
  kSqrtAbarPrev = 14,
  kSqrt1mAbarPrev = 15,
  kSnr = 16,
  kAbarNext = 17,
  kLog1mAbar = 18,
  kNumCols = 19
};

// whether a variance type reads the model's variance output (the second half of model_output's channels)
inline constexpr bool is_learned(int64_t var_type) { return var_type == kLearned || var_type == kLearnedRange; }

}  // namespace ddpm
