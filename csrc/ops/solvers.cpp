// ops/solvers.cpp -- the solvers family: solver_update, the fused step of the multistep samplers (schema, host
// function; body in solvers.h). No autograd: the Python router sends inputs that require grad to the reference.
#include "solvers.h"

#include "host.h"

namespace ddpm {
namespace op {
namespace {

bool given(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// an [B, ...] operand of x's shape and device whose dtype is the compute dtype S, or also x's own dtype
// (x_dtype_ok); the message names the argument
void check_like_x(const char* name, const Tensor& t, const Tensor& x, bool x_dtype_ok) {
  const auto S = compute_type(x.scalar_type());
  const auto s = t.scalar_type();
  if (x_dtype_ok) {
    TORCH_CHECK_TYPE(s == S || s == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), " (that of x) or ",
                     S, " (the compute dtype), got ", s);
  } else {
    TORCH_CHECK_TYPE(s == S, name, ": expected dtype ", S, " (the compute dtype of x's ", x.scalar_type(), "), got ",
                     s);
  }
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), " (that of x), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), " (like x), got ", t.device());
}

// a per-sample [B] vector of the compute dtype on x's device
void check_per_sample(const char* name, const Tensor& t, const Tensor& x) {
  const auto S = compute_type(x.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == S, name, ": expected dtype ", S, " (the compute dtype of x's ",
                   x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0) && t.is_contiguous(), name,
                    ": expected a contiguous tensor of shape (", x.size(0), ",), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), " (like x), got ", t.device());
}

// rows: the [R, kNumSolverCols] coefficient table (not the schedule's); row_index: int64 [B], each in [0, R)
// (read on the CPU host path only: a CUDA index is checked by the kernel's device assert, no host sync)
void check_rows(const Tensor& rows, const Tensor& row_index, const Tensor& x) {
  const auto S = compute_type(x.scalar_type());
  TORCH_CHECK_TYPE(rows.scalar_type() == S, "rows: expected dtype ", S, " (the compute dtype of x's ", x.scalar_type(),
                   "), got ", rows.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(1) == kNumSolverCols && rows.is_contiguous(),
                    "rows: expected a contiguous tensor of shape (R, ", int(kNumSolverCols), "), got shape ",
                    rows.sizes());
  TORCH_CHECK_VALUE(rows.device() == x.device(), "rows: expected device ", x.device(), " (like x), got ",
                    rows.device());
  const int64_t B = x.size(0);
  TORCH_CHECK_TYPE(row_index.scalar_type() == at::kLong, "row_index: expected an int64 tensor, got ",
                   row_index.scalar_type());
  TORCH_CHECK_VALUE(row_index.dim() == 1 && row_index.size(0) == B && row_index.is_contiguous(),
                    "row_index: expected a contiguous tensor of shape (", B, ",), got shape ", row_index.sizes());
  TORCH_CHECK_VALUE(row_index.device() == x.device(), "row_index: expected device ", x.device(), " (like x), got ",
                    row_index.device());
  if (!cuda_path(row_index)) {
    const int64_t* index = row_index.data_ptr<int64_t>();
    const int64_t R = rows.size(0);
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_VALUE(index[b] >= 0 && index[b] < R, "row_index: expected rows in [0, ", R, "), got ", index[b],
                        " for sample ", b);
  }
}

// x_prev (returned, x's dtype and the plan layout); m_out gets m, a given last_sample gets `corrected`, in place
Tensor solver_update(const Tensor& x, const Tensor& model_output, const c10::optional<Tensor>& model_cond,
                     const Tensor& rows, const Tensor& row_index, double guidance_scale,
                     const c10::optional<Tensor>& cfg_factor, const c10::optional<Tensor>& thresh,
                     const c10::optional<Tensor>& h1, const c10::optional<Tensor>& h2,
                     const c10::optional<Tensor>& h3, const c10::optional<Tensor>& last_sample,
                     const c10::optional<Tensor>& noise, bool draw_noise, int64_t seed,
                     const c10::optional<Tensor>& seed_key, const Tensor& m_out) {
  using Body = SolverUpdateElem<float>;
  check_input("x", x);
  check_like_x("model_output", model_output, x, true);
  if (given(model_cond)) check_like_x("model_cond", *model_cond, x, true);
  check_rows(rows, row_index, x);
  if (given(cfg_factor)) check_per_sample("cfg_factor", *cfg_factor, x);
  if (given(thresh)) check_per_sample("thresh", *thresh, x);
  if (given(h1)) check_like_x("h1", *h1, x, false);
  if (given(h2)) check_like_x("h2", *h2, x, false);
  if (given(h3)) check_like_x("h3", *h3, x, false);
  if (given(last_sample)) check_like_x("last_sample", *last_sample, x, false);
  if (given(noise)) check_like_x("noise", *noise, x, true);
  check_like_x("m_out", m_out, x, false);
  Plan p = make_plan(x);
  Tensor x_prev = alloc_like_plan(p, x.sizes(), x.options());
  Runner<SolverUpdateElem> r(p, x, x.scalar_type() == at::kDouble);
  auto in = [&](int slot, const c10::optional<Tensor>& t) {
    if (given(t)) r.in(slot, *t);
  };
  r.in(Body::in_x, x), r.in(Body::in_uncond, model_output), in(Body::in_cond, model_cond);
  in(Body::in_h1, h1), in(Body::in_h2, h2), in(Body::in_h3, h3), in(Body::in_last, last_sample);
  if (given(noise)) r.in(Body::in_noise, *noise);
  else if (draw_noise) r.philox_noise(Body::in_noise, seed, seed_key);
  // the outputs may share memory with inputs of the same element (m_out with h3, last_sample with itself): the
  // drivers read all inputs of an element before they write its outputs; on the CUDA path a non-direct output
  // is written to a plan-layout temporary and copied back after the launch
  r.out(Body::out_x_prev, x_prev), r.out(Body::out_m, m_out);
  if (given(last_sample)) r.out(Body::out_corrected, *last_sample);
  r.table(rows, row_index);
  r.set_options([&](auto& o) {
    using S = std::remove_reference_t<decltype(o.guidance_scale)>;
    o.guidance_scale = static_cast<S>(guidance_scale);
    o.inputs = (given(model_cond) ? Body::kHasCond : 0u) | (given(noise) || draw_noise ? Body::kHasNoise : 0u) |
               (given(h1) ? Body::kHasH1 : 0u) | (given(h2) ? Body::kHasH2 : 0u) | (given(h3) ? Body::kHasH3 : 0u) |
               (given(last_sample) ? Body::kHasLast : 0u);
    o.cfg_factor = nullptr;
    o.thresh = nullptr;
    const auto dtype = c10::CppTypeToScalarType<S>::value;  // the per-sample data goes to its dtype's options
    if (given(cfg_factor) && cfg_factor->scalar_type() == dtype) o.cfg_factor = cfg_factor->data_ptr<S>();
    if (given(thresh) && thresh->scalar_type() == dtype) o.thresh = thresh->data_ptr<S>();
  });
  r.run();
  return x_prev;
}

DDPM_DEVICE_OP(solver_update, "(Tensor x, Tensor model_output, Tensor? model_cond, Tensor rows, Tensor row_index, "
                              "float guidance_scale, Tensor? cfg_factor, Tensor? thresh, Tensor? h1, Tensor? h2, "
                              "Tensor? h3, Tensor(a!)? last_sample, Tensor? noise, bool draw_noise, int seed, "
                              "Tensor? seed_key, Tensor(b!) m_out) -> Tensor")

}  // namespace
}  // namespace op
}  // namespace ddpm
