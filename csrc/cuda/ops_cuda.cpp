// CUDA launchers: check the torch inputs (shared checks in ops_checks.h), then call the extern "C"
// kernels on the current stream. No value is read back from the device, so every op can be captured in
// a CUDA graph; values that only the device holds are clamped inside the kernels instead of checked.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops_checks.h"
#include "launchers.h"

namespace dreamr {
namespace {

DreamrDType dtype_of(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kDreamrFloat32;
    case at::kDouble: return kDreamrFloat64;
    case at::kHalf: return kDreamrFloat16;
    case at::kBFloat16: return kDreamrBFloat16;
    default: TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", t);
  }
}

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(status));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor> cpn_verify_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, at::IntArrayRef positive_ids,
                                                   at::IntArrayRef negative_ids, double alpha, double logit_softcap) {
  const VerdictIds ids = check_cpn_inputs(hidden, weight, bias, positive_ids, negative_ids, alpha, logit_softcap);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t batch = hidden.size(0);
  at::Tensor cpn = at::empty({batch}, hidden.options().dtype(at::kFloat));
  at::Tensor accept = at::empty({batch}, hidden.options().dtype(at::kBool));
  check_launch("cpn_verify",
               dreamr_cpn_verify_cuda(hidden.data_ptr(), weight.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr,
                                      batch, hidden.size(1), dtype_of("cpn_verify", hidden.scalar_type()), ids,
                                      static_cast<float>(alpha), static_cast<float>(logit_softcap),
                                      cpn.data_ptr<float>(), accept.data_ptr<bool>(), current_stream()));
  return {cpn, accept};
}

std::tuple<at::Tensor, at::Tensor> cpn_window_accept_cuda(const at::Tensor& cpn, const at::Tensor& valid,
                                                          double alpha) {
  check_window_inputs(cpn, valid, alpha);
  const c10::cuda::CUDAGuard guard(cpn.device());
  at::Tensor num_accepted = at::empty({cpn.size(0)}, cpn.options().dtype(at::kLong));
  at::Tensor accept = at::empty(cpn.sizes(), cpn.options().dtype(at::kBool));
  check_launch("cpn_window_accept",
               dreamr_cpn_window_accept_cuda(cpn.data_ptr<float>(), valid.data_ptr<bool>(), cpn.size(0), cpn.size(1),
                                             static_cast<float>(alpha), num_accepted.data_ptr<int64_t>(),
                                             accept.data_ptr<bool>(), current_stream()));
  return {num_accepted, accept};
}

at::Tensor kv_rollback_cuda(at::TensorList cache, const at::Tensor& lengths, const c10::optional<at::Tensor>& src_row,
                            const c10::optional<at::Tensor>& src_start, const c10::optional<at::Tensor>& copy_length) {
  const RollbackShape shape = check_rollback_inputs(cache, lengths, src_row, src_start, copy_length);
  TORCH_CHECK_VALUE(shape.batch <= 65535 && shape.heads <= 65535, "kv_rollback: B = ", shape.batch, " and H_kv = ",
                    shape.heads, " must each be at most 65535 on CUDA");
  const c10::cuda::CUDAGuard guard(lengths.device());
  DreamrCachePointers pointers{};
  for (size_t i = 0; i < cache.size(); ++i) pointers.data[i] = cache[i].data_ptr();
  at::Tensor new_lengths = at::empty({shape.batch}, lengths.options());
  auto ptr = [](const c10::optional<at::Tensor>& t) -> const int64_t* {
    return t.has_value() ? t->data_ptr<int64_t>() : nullptr;
  };
  check_launch("kv_rollback",
               dreamr_kv_rollback_cuda(pointers, static_cast<int64_t>(cache.size()), cache[0].element_size(), shape,
                                       lengths.data_ptr<int64_t>(), ptr(src_row), ptr(src_start), ptr(copy_length),
                                       new_lengths.data_ptr<int64_t>(), current_stream()));
  return new_lengths;
}

void kv_compact_cuda(at::TensorList cache, const at::Tensor& src_rows, const at::Tensor& columns,
                     const at::Tensor& counts) {
  const CompactInputs in = check_compact_inputs(cache, src_rows, columns, counts);
  TORCH_CHECK_VALUE(in.shape.heads <= 65535, "kv_compact: H_kv = ", in.shape.heads, " must be at most 65535 on CUDA");
  const c10::cuda::CUDAGuard guard(src_rows.device());
  DreamrCachePointers pointers{};
  for (size_t i = 0; i < cache.size(); ++i) pointers.data[i] = cache[i].data_ptr();
  check_launch("kv_compact", dreamr_kv_compact_cuda(pointers, static_cast<int64_t>(cache.size()),
                                                    cache[0].element_size(), in.shape, in.plan, current_stream()));
}

std::tuple<at::Tensor, at::Tensor> speculative_sample_cuda(const at::Tensor& draft_probs, const at::Tensor& draft_ids,
                                                           const at::Tensor& target_probs,
                                                           const at::Tensor& uniforms) {
  const SamplingShape s = check_sampling_inputs(draft_probs, draft_ids, target_probs, uniforms);
  const c10::cuda::CUDAGuard guard(draft_ids.device());
  at::Tensor tokens = at::empty({s.batch, s.draft_len + 1}, draft_ids.options());
  at::Tensor num_accepted = at::empty({s.batch}, draft_ids.options());
  check_launch("speculative_sample",
               dreamr_speculative_sample_cuda(draft_probs.data_ptr(), draft_ids.data_ptr<int64_t>(),
                                              target_probs.data_ptr(), uniforms.data_ptr<float>(), s,
                                              dtype_of("speculative_sample", draft_probs.scalar_type()),
                                              tokens.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(),
                                              current_stream()));
  return {tokens, num_accepted};
}

std::tuple<at::Tensor, at::Tensor> greedy_verify_cuda(const at::Tensor& draft_ids, const at::Tensor& target_logits) {
  const SamplingShape s = check_greedy_inputs(draft_ids, target_logits);
  const c10::cuda::CUDAGuard guard(draft_ids.device());
  at::Tensor tokens = at::empty({s.batch, s.draft_len + 1}, draft_ids.options());
  at::Tensor num_accepted = at::empty({s.batch}, draft_ids.options());
  check_launch("greedy_verify",
               dreamr_greedy_verify_cuda(draft_ids.data_ptr<int64_t>(), target_logits.data_ptr(), s,
                                         dtype_of("greedy_verify", target_logits.scalar_type()),
                                         tokens.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(),
                                         current_stream()));
  return {tokens, num_accepted};
}

}  // namespace

TORCH_LIBRARY_IMPL(dreamr, CUDA, m) {
  m.impl("cpn_verify", &cpn_verify_cuda);
  m.impl("cpn_window_accept", &cpn_window_accept_cuda);
  m.impl("kv_rollback_", &kv_rollback_cuda);
  m.impl("kv_compact_", &kv_compact_cuda);
  m.impl("speculative_sample", &speculative_sample_cuda);
  m.impl("greedy_verify", &greedy_verify_cuda);
}

}  // namespace dreamr
