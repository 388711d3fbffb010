// CPU launchers: check inputs, then run the header kernels over rows with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/matmul.h>
#include <torch/library.h>

#include "../ops_checks.h"
#include "dreamr/cpn_bf16_x86.h"

namespace dreamr {
namespace {

// Rows are independent; spread them over the cores, a few rows per task.
template <typename F>
void for_each_row(int64_t rows, int64_t grain, const F& f) {
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

std::tuple<at::Tensor, at::Tensor> cpn_verify_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef positive_ids,
                                                  at::IntArrayRef negative_ids, double alpha, double logit_softcap) {
  const VerdictIds ids = check_cpn_inputs(hidden, weight, bias, positive_ids, negative_ids, alpha, logit_softcap);
  const int64_t batch = hidden.size(0), count = ids.num_positive + ids.num_negative;
  // Gather only the |P| + |N| verdict rows of the LM head and take their logits with one BLAS product
  // ([B, H] x [H, |P|+|N|], accumulated in float, or double for double inputs); never a [B, V] tensor.
  const at::ScalarType acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor token_ids = at::empty({count}, hidden.options().dtype(at::kLong));
  int64_t* token_ptr = token_ids.data_ptr<int64_t>();
  for (int k = 0; k < count; ++k) {
    token_ptr[k] = verdict_token(ids, k);
  }
  at::Tensor logits;  // [B, count]
  if (hidden.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16()) {
    // bf16 x bf16 products accumulated in float32 by the CPU itself: no widened copy of hidden.
    logits = at::empty({batch, count}, hidden.options().dtype(at::kFloat));
    const auto* h = reinterpret_cast<const uint16_t*>(hidden.data_ptr<at::BFloat16>());
    const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
    const int64_t hidden_size = hidden.size(1);
    float* out = logits.data_ptr<float>();
    at::parallel_for(0, batch, 8, [&](int64_t begin, int64_t end) {
      verdict_logits_bf16(h, hidden_size, w, hidden_size, token_ptr, count, hidden_size, begin, end, out);
    });
  } else {
    logits = at::matmul(hidden.to(acc), weight.index_select(0, token_ids).to(acc).t());
  }
  if (bias.has_value()) logits.add_(bias->index_select(0, token_ids).to(acc));
  logits = logits.contiguous();

  at::Tensor cpn = at::empty({batch}, hidden.options().dtype(at::kFloat));
  at::Tensor accept = at::empty({batch}, hidden.options().dtype(at::kBool));
  float* cpn_ptr = cpn.data_ptr<float>();
  bool* accept_ptr = accept.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(acc, "cpn_epilogue_cpu", [&] {
    scalar_t* l = logits.data_ptr<scalar_t>();
    for (int64_t row = 0; row < batch; ++row) {
      cpn_epilogue_row<scalar_t>(l + row * count, ids, static_cast<float>(alpha), static_cast<float>(logit_softcap),
                                 cpn_ptr + row, accept_ptr + row);
    }
  });
  return {cpn, accept};
}

std::tuple<at::Tensor, at::Tensor> cpn_window_accept_cpu(const at::Tensor& cpn, const at::Tensor& valid,
                                                         double alpha) {
  check_window_inputs(cpn, valid, alpha);
  const int64_t requests = cpn.size(0), window = cpn.size(1);
  at::Tensor num_accepted = at::empty({requests}, cpn.options().dtype(at::kLong));
  at::Tensor accept = at::empty({requests, window}, cpn.options().dtype(at::kBool));
  const float* c = cpn.data_ptr<float>();
  const bool* v = valid.data_ptr<bool>();
  bool* a = accept.data_ptr<bool>();
  int64_t* n = num_accepted.data_ptr<int64_t>();
  for (int64_t r = 0; r < requests; ++r) {
    n[r] = window_accept_row(c + r * window, v + r * window, window, static_cast<float>(alpha), a + r * window);
  }
  return {num_accepted, accept};
}

at::Tensor kv_rollback_cpu(at::TensorList cache, const at::Tensor& lengths, const c10::optional<at::Tensor>& src_row,
                           const c10::optional<at::Tensor>& src_start, const c10::optional<at::Tensor>& copy_length) {
  const RollbackShape shape = check_rollback_inputs(cache, lengths, src_row, src_start, copy_length);
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t* row = src_row.has_value() ? src_row->data_ptr<int64_t>() : nullptr;
  const int64_t* start = src_start.has_value() ? src_start->data_ptr<int64_t>() : nullptr;
  const int64_t* count = copy_length.has_value() ? copy_length->data_ptr<int64_t>() : nullptr;
  check_rollback_values(len, row, start, count, shape.batch, shape.time);

  std::vector<RowPlan> plans(shape.batch);
  at::Tensor new_lengths = at::empty({shape.batch}, lengths.options());
  int64_t* new_len = new_lengths.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < shape.batch; ++b) {
    plans[b] = plan_row(b, shape, len, row, start, count);
    new_len[b] = plans[b].keep + plans[b].copied;
    longest = std::max(longest, new_len[b]);
  }
  const int64_t element_size = static_cast<int64_t>(cache[0].element_size());
  const int64_t tensors = static_cast<int64_t>(cache.size());
  for_each_row(tensors * shape.batch, 1, [&](int64_t task) {
    const int64_t t = task / shape.batch, b = task % shape.batch;
    rollback_row_cpu(static_cast<char*>(cache[t].data_ptr()), element_size, shape, b, plans[b], longest);
  });
  return new_lengths;
}

void kv_compact_cpu(at::TensorList cache, const at::Tensor& src_rows, const at::Tensor& columns,
                    const at::Tensor& counts) {
  const CompactInputs in = check_compact_inputs(cache, src_rows, columns, counts);
  const RollbackShape& shape = in.shape;
  const CompactPlan& plan = in.plan;
  check_compact_values(plan, shape.batch, shape.time);
  const int64_t zero_end = longest_count(plan);
  const int64_t element_size = static_cast<int64_t>(cache[0].element_size());
  // One task per (tensor, head): rows depend on each other (row i may read a row that a later task
  // rewrites), heads and tensors never do, so each task runs the rows in order (rollback.h, CompactPlan).
  for_each_row(static_cast<int64_t>(cache.size()) * shape.heads, 1, [&](int64_t task) {
    const int64_t t = task / shape.heads, h = task % shape.heads;
    compact_head_cpu(static_cast<char*>(cache[t].data_ptr()), element_size, shape, h, plan, zero_end);
  });
}

std::tuple<at::Tensor, at::Tensor> speculative_sample_cpu(const at::Tensor& draft_probs, const at::Tensor& draft_ids,
                                                          const at::Tensor& target_probs, const at::Tensor& uniforms) {
  const SamplingShape s = check_sampling_inputs(draft_probs, draft_ids, target_probs, uniforms);
  check_token_ids("speculative_sample", draft_ids.data_ptr<int64_t>(), draft_ids.numel(), s.vocab);
  const float* u = uniforms.data_ptr<float>();
  for (int64_t i = 0; i < uniforms.numel(); ++i) {
    DREAMR_CHECK(u[i] >= 0.f && u[i] < 1.f, "speculative_sample: uniforms must lie in [0, 1), got ", u[i],
                 " at flat index ", i);
  }
  at::Tensor tokens = at::empty({s.batch, s.draft_len + 1}, draft_ids.options());
  at::Tensor num_accepted = at::empty({s.batch}, draft_ids.options());
  int64_t* tok = tokens.data_ptr<int64_t>();
  int64_t* acc = num_accepted.data_ptr<int64_t>();
  const int64_t* ids = draft_ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, draft_probs.scalar_type(), "speculative_sample_cpu", [&] {
    const scalar_t* q = draft_probs.data_ptr<scalar_t>();
    const scalar_t* p = target_probs.data_ptr<scalar_t>();
    for_each_row(s.batch, 1, [&](int64_t b) { acc[b] = speculative_sample_row_cpu(q, ids, p, u, s, b, tok); });
  });
  return {tokens, num_accepted};
}

std::tuple<at::Tensor, at::Tensor> greedy_verify_cpu(const at::Tensor& draft_ids, const at::Tensor& target_logits) {
  const SamplingShape s = check_greedy_inputs(draft_ids, target_logits);
  check_token_ids("greedy_verify", draft_ids.data_ptr<int64_t>(), draft_ids.numel(), s.vocab);
  at::Tensor tokens = at::empty({s.batch, s.draft_len + 1}, draft_ids.options());
  at::Tensor num_accepted = at::empty({s.batch}, draft_ids.options());
  int64_t* tok = tokens.data_ptr<int64_t>();
  int64_t* acc = num_accepted.data_ptr<int64_t>();
  const int64_t* ids = draft_ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_logits.scalar_type(), "greedy_verify_cpu", [&] {
    const scalar_t* logits = target_logits.data_ptr<scalar_t>();
    for_each_row(s.batch, 1, [&](int64_t b) { acc[b] = greedy_verify_row_cpu(ids, logits, s, b, tok); });
  });
  return {tokens, num_accepted};
}

}  // namespace

TORCH_LIBRARY_IMPL(dreamr, CPU, m) {
  m.impl("cpn_verify", &cpn_verify_cpu);
  m.impl("cpn_window_accept", &cpn_window_accept_cpu);
  m.impl("kv_rollback_", &kv_rollback_cpu);
  m.impl("kv_compact_", &kv_compact_cpu);
  m.impl("speculative_sample", &speculative_sample_cpu);
  m.impl("greedy_verify", &greedy_verify_cpu);
}

}  // namespace dreamr
