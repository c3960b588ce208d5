// ops/families.h -- every family header of csrc/ops/, for the drivers: cpu/kernels.cpp and cuda/kernels.cu
// define DDPM_BODY and include this file last, which instantiates their launch function for each body the
// headers list. A new op adds its body to its family header only; a new family adds one line here
// (tests/test_build.py checks that every csrc/ops/*.h with DDPM_BODY lines is listed).
#pragma once

#include "forward_process.h"
#include "sampling.h"
#include "losses.h"
#include "elementwise.h"
#include "solvers.h"
