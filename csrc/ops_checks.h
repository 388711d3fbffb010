// Input checks shared by the CPU and CUDA launchers. Every failure raises a Python ValueError whose
// message names the op, the argument and what was wrong (the shape, dtype, device or value seen).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>
#include <unordered_set>
#include <vector>

#include "dreamr/cpn.h"
#include "dreamr/rollback.h"
#include "dreamr/sampling.h"

namespace dreamr {

#define DREAMR_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

inline void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim, const at::Device& device) {
  DREAMR_CHECK(t.defined(), op, ": ", name, " is undefined");
  DREAMR_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  DREAMR_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the other inputs are on ", device,
               "; move it with .to(", device, ")");
  DREAMR_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ", t.strides(),
               "); call .contiguous() first");
}

// dtype names as Python users write them (torch.float32, not Float).
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected) {
  DREAMR_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", dtype_name(expected), ", got ",
               dtype_name(t.scalar_type()));
}

inline void check_alpha(const char* op, double alpha) {
  DREAMR_CHECK(alpha >= 0.0 && alpha <= 1.0, op, ": alpha must be a number in [0, 1], got ", alpha);
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline VerdictIds check_cpn_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, at::IntArrayRef positive,
                                   at::IntArrayRef negative, double alpha, double softcap) {
  const char* op = "cpn_verify";
  DREAMR_CHECK(hidden.defined() && hidden.dim() == 2, op, ": hidden must be [B, H], got shape ",
               hidden.defined() ? hidden.sizes() : at::IntArrayRef{});
  const at::Device device = hidden.device();
  check_tensor(op, "hidden", hidden, 2, device);
  check_tensor(op, "lm_head_weight", weight, 2, device);
  DREAMR_CHECK(is_float_type(hidden.scalar_type()), op, ": hidden must be float32, float64, bfloat16 or float16, got ",
               dtype_name(hidden.scalar_type()));
  check_dtype(op, "lm_head_weight", weight, hidden.scalar_type());
  DREAMR_CHECK(weight.size(1) == hidden.size(1), op, ": lm_head_weight must be [V, H] with H = ", hidden.size(1),
               " (hidden's last dimension), got shape ", weight.sizes());
  const int64_t vocab = weight.size(0);
  if (bias.has_value()) {
    check_tensor(op, "lm_head_bias", *bias, 1, device);
    check_dtype(op, "lm_head_bias", *bias, hidden.scalar_type());
    DREAMR_CHECK(bias->size(0) == vocab, op, ": lm_head_bias must be [V] with V = ", vocab, ", got shape ",
                 bias->sizes());
  }
  check_alpha(op, alpha);
  DREAMR_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": logit_softcap must be >= 0 (0 disables it), got ",
               softcap);

  VerdictIds ids{};
  std::unordered_set<int64_t> seen_positive;
  auto fill = [&](const char* name, at::IntArrayRef src, int32_t* dst, int32_t* count, bool positive_set) {
    DREAMR_CHECK(!src.empty(), op, ": ", name, " is empty; give at least one verdict token id");
    DREAMR_CHECK(static_cast<int>(src.size()) <= kMaxVerdictIds, op, ": ", name, " has ", src.size(),
                 " ids, more than the ", kMaxVerdictIds, " supported");
    std::unordered_set<int64_t> seen;
    for (size_t i = 0; i < src.size(); ++i) {
      const int64_t id = src[i];
      DREAMR_CHECK(id >= 0 && id < vocab, op, ": ", name, "[", i, "] = ", id, " is outside the vocabulary [0, ", vocab,
                   ")");
      DREAMR_CHECK(seen.insert(id).second, op, ": ", name, " repeats token id ", id);
      if (positive_set) {
        seen_positive.insert(id);
      } else {
        DREAMR_CHECK(!seen_positive.count(id), op, ": token id ", id,
                     " is in both positive_ids and negative_ids; the verdict sets must be disjoint");
      }
      dst[i] = static_cast<int32_t>(id);
    }
    *count = static_cast<int32_t>(src.size());
  };
  fill("positive_ids", positive, ids.positive, &ids.num_positive, true);
  fill("negative_ids", negative, ids.negative, &ids.num_negative, false);
  return ids;
}

inline void check_window_inputs(const at::Tensor& cpn, const at::Tensor& valid, double alpha) {
  const char* op = "cpn_window_accept";
  DREAMR_CHECK(cpn.defined() && cpn.dim() == 2, op, ": cpn must be [R, W], got shape ",
               cpn.defined() ? cpn.sizes() : at::IntArrayRef{});
  check_tensor(op, "cpn", cpn, 2, cpn.device());
  check_tensor(op, "valid", valid, 2, cpn.device());
  check_dtype(op, "cpn", cpn, at::kFloat);
  check_dtype(op, "valid", valid, at::kBool);
  DREAMR_CHECK(valid.sizes() == cpn.sizes(), op, ": valid must have cpn's shape ", cpn.sizes(), ", got ",
               valid.sizes());
  check_alpha(op, alpha);
}

// The cache of kv_rollback and kv_compact: 1 to kMaxCacheTensors tensors [B, H_kv, T, D] of one shape,
// layout, dtype and device, dense in D, no element shared (they are written in place).
inline RollbackShape check_cache_tensors(const char* op, at::TensorList cache) {
  DREAMR_CHECK(!cache.empty(), op, ": cache is empty; pass the keys and values of every layer");
  DREAMR_CHECK(static_cast<int64_t>(cache.size()) <= kMaxCacheTensors, op, ": cache has ", cache.size(),
               " tensors, more than the ", kMaxCacheTensors, " supported in one call; split the layers");
  const at::Tensor& first = cache[0];
  DREAMR_CHECK(first.defined() && first.dim() == 4, op, ": cache[0] must be [B, H_kv, T, D], got shape ",
               first.defined() ? first.sizes() : at::IntArrayRef{});
  for (size_t i = 0; i < cache.size(); ++i) {
    const std::string name = "cache[" + std::to_string(i) + "]";
    const at::Tensor& t = cache[i];
    DREAMR_CHECK(t.defined() && t.dim() == 4, op, ": ", name, " must be [B, H_kv, T, D], got shape ",
                 t.defined() ? t.sizes() : at::IntArrayRef{});
    DREAMR_CHECK(t.device() == first.device(), op, ": ", name, " is on ", t.device(), " but cache[0] is on ",
                 first.device());
    DREAMR_CHECK(t.sizes() == first.sizes(), op, ": ", name, " has shape ", t.sizes(), " but cache[0] has ",
                 first.sizes(), "; all layers must share one shape");
    check_dtype(op, name.c_str(), t, first.scalar_type());
    // Strided rows, heads and positions are fine (cropped caches are views); the head dim must be dense.
    DREAMR_CHECK(t.size(3) == 1 || t.stride(3) == 1, op, ": ", name, " must be dense in its last (head) dimension, ",
                 "got strides ", t.strides(), "; call .contiguous() first");
    DREAMR_CHECK(t.strides() == first.strides(), op, ": ", name, " has strides ", t.strides(), " but cache[0] has ",
                 first.strides(), "; all layers must share one layout");
    // Rows, heads or positions sharing memory (an expanded view, stride 0) would make one row's writes
    // land in another's: refuse them.
    DREAMR_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
                 " has elements that share memory (shape ", t.sizes(), ", strides ", t.strides(),
                 "), e.g. an expanded view; it is written in place, so pass a tensor that owns each element "
                 "(.contiguous() or .clone())");
  }
  return RollbackShape{first.size(0),  first.size(1),   first.size(2),  first.size(3),
                       first.stride(0), first.stride(1), first.stride(2)};
}

inline RollbackShape check_rollback_inputs(at::TensorList cache, const at::Tensor& lengths,
                                           const c10::optional<at::Tensor>& src_row,
                                           const c10::optional<at::Tensor>& src_start,
                                           const c10::optional<at::Tensor>& copy_length) {
  const char* op = "kv_rollback";
  const RollbackShape shape = check_cache_tensors(op, cache);
  const at::Tensor& first = cache[0];
  const int64_t batch = shape.batch;
  auto check_row_vector = [&](const char* name, const at::Tensor& t) {
    check_tensor(op, name, t, 1, first.device());
    check_dtype(op, name, t, at::kLong);
    DREAMR_CHECK(t.size(0) == batch, op, ": ", name, " must be [B] with B = ", batch, ", got shape ", t.sizes());
  };
  check_row_vector("lengths", lengths);
  const int given = src_row.has_value() + src_start.has_value() + copy_length.has_value();
  DREAMR_CHECK(given == 0 || given == 3, op,
               ": copy_src_row, copy_src_start and copy_length must be given together or not at all");
  if (given == 3) {
    check_row_vector("copy_src_row", *src_row);
    check_row_vector("copy_src_start", *src_start);
    check_row_vector("copy_length", *copy_length);
  }
  return shape;
}

// Value checks for rollback, on host data. The CPU launcher runs them on its tensors; on CUDA the
// Python wrapper runs them (via the kv_rollback_check op) when it was given host values.
inline void check_rollback_values(const int64_t* lengths, const int64_t* src_row, const int64_t* src_start,
                                  const int64_t* copy_length, int64_t batch, int64_t time) {
  const char* op = "kv_rollback";
  for (int64_t b = 0; b < batch; ++b) {
    DREAMR_CHECK(lengths[b] >= 0 && lengths[b] <= time, op, ": lengths[", b, "] = ", lengths[b],
                 " is outside [0, T] with T = ", time);
  }
  if (src_row == nullptr) return;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t s = src_row[b];
    if (s < 0) continue;
    DREAMR_CHECK(s < batch, op, ": copy_src_row[", b, "] = ", s, " is not a row of the batch [0, ", batch, ")");
    DREAMR_CHECK(s != b, op, ": copy_src_row[", b, "] = ", s, " copies a row into itself");
    DREAMR_CHECK(src_row[s] < 0, op, ": row ", s, " is the source of row ", b,
                 "'s copy and also receives a copy itself; do the two copies in separate calls");
    DREAMR_CHECK(copy_length[b] >= 0, op, ": copy_length[", b, "] = ", copy_length[b], " is negative");
    DREAMR_CHECK(src_start[b] >= 0 && src_start[b] + copy_length[b] <= lengths[s], op, ": row ", b,
                 " copies positions [", src_start[b], ", ", src_start[b] + copy_length[b], ") of row ", s,
                 ", which keeps only [0, ", lengths[s], "); a source span must lie inside what its row keeps");
    DREAMR_CHECK(lengths[b] + copy_length[b] <= time, op, ": row ", b, " would grow to ", lengths[b] + copy_length[b],
                 " positions, more than the cache's T = ", time, "; grow the cache first");
  }
}

// The plan tensors of kv_compact against a cache of B rows and T positions on `device`: src_rows [B'] with
// B' <= B, columns [B', W] with W <= T, counts [B']; int64, contiguous. Returns the plan over their data
// (host or device pointers, as the tensors are).
inline CompactPlan check_compact_plan(const at::Tensor& src_rows, const at::Tensor& columns, const at::Tensor& counts,
                                      const at::Device& device, int64_t batch, int64_t time) {
  const char* op = "kv_compact";
  check_tensor(op, "src_rows", src_rows, 1, device);
  check_dtype(op, "src_rows", src_rows, at::kLong);
  const int64_t rows = src_rows.size(0);
  DREAMR_CHECK(rows <= batch, op, ": src_rows must be [B'] with B' <= B = ", batch,
               " (one entry per output row of the cache), got shape ", src_rows.sizes());
  check_tensor(op, "columns", columns, 2, device);
  check_dtype(op, "columns", columns, at::kLong);
  DREAMR_CHECK(columns.size(0) == rows && columns.size(1) <= time, op, ": columns must be [B', W] with B' = ", rows,
               " (src_rows' length) and W <= T = ", time, ", got shape ", columns.sizes());
  check_tensor(op, "counts", counts, 1, device);
  check_dtype(op, "counts", counts, at::kLong);
  DREAMR_CHECK(counts.size(0) == rows, op, ": counts must be [B'] with B' = ", rows, " (src_rows' length), got shape ",
               counts.sizes());
  return CompactPlan{rows, columns.size(1), src_rows.data_ptr<int64_t>(), columns.data_ptr<int64_t>(),
                     counts.data_ptr<int64_t>()};
}

struct CompactInputs {
  RollbackShape shape;
  CompactPlan plan;
};

inline CompactInputs check_compact_inputs(at::TensorList cache, const at::Tensor& src_rows, const at::Tensor& columns,
                                          const at::Tensor& counts) {
  const RollbackShape shape = check_cache_tensors("kv_compact", cache);
  return {shape, check_compact_plan(src_rows, columns, counts, cache[0].device(), shape.batch, shape.time)};
}

// Value checks for compaction, on host data: the order rules of rollback.h (CompactPlan) that make the
// in-place pass safe, and every index in range. The CPU launcher runs them on its tensors; on CUDA the
// Python wrapper runs them (via the kv_compact_check op) when it was given host values.
inline void check_compact_values(const CompactPlan& p, int64_t batch, int64_t time) {
  const char* op = "kv_compact";
  for (int64_t i = 0; i < p.rows; ++i) {
    const int64_t s = p.src_rows[i];
    DREAMR_CHECK(s >= 0 && s < batch, op, ": src_rows[", i, "] = ", s, " is not a row of the cache [0, ", batch, ")");
    DREAMR_CHECK(i == 0 || s > p.src_rows[i - 1], op, ": src_rows must be strictly increasing (rows are compacted in "
                 "place, front to back), got src_rows[", i - 1, "] = ", (i ? p.src_rows[i - 1] : 0), " then src_rows[",
                 i, "] = ", s, "; keep the rows in their order in the cache");
    const int64_t n = p.counts[i];
    DREAMR_CHECK(n >= 0 && n <= p.width, op, ": counts[", i, "] = ", n, " is outside [0, W] with W = ", p.width,
                 " (columns' second dimension)");
    const int64_t* cols = p.columns + i * p.width;
    for (int64_t j = 0; j < n; ++j) {
      DREAMR_CHECK(cols[j] >= 0 && cols[j] < time, op, ": columns[", i, ", ", j, "] = ", cols[j],
                   " is outside [0, T) with T = ", time);
      DREAMR_CHECK(j == 0 || cols[j] > cols[j - 1], op, ": columns[", i, "] must be strictly increasing over its "
                   "first counts[", i, "] = ", n, " entries (entries move left, in place), got columns[", i, ", ",
                   j - 1, "] = ", (j ? cols[j - 1] : 0), " then columns[", i, ", ", j, "] = ", cols[j]);
    }
  }
}

inline SamplingShape check_sampling_inputs(const at::Tensor& q, const at::Tensor& draft_ids, const at::Tensor& p,
                                           const at::Tensor& uniforms) {
  const char* op = "speculative_sample";
  DREAMR_CHECK(draft_ids.defined() && draft_ids.dim() == 2, op, ": draft_ids must be [B, K], got shape ",
               draft_ids.defined() ? draft_ids.sizes() : at::IntArrayRef{});
  const at::Device device = draft_ids.device();
  check_tensor(op, "draft_probs", q, 3, device);
  check_tensor(op, "draft_ids", draft_ids, 2, device);
  check_tensor(op, "target_probs", p, 3, device);
  check_tensor(op, "uniforms", uniforms, 2, device);
  DREAMR_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
               ": draft_probs must be float32, float16 or bfloat16, got ", dtype_name(q.scalar_type()));
  check_dtype(op, "target_probs", p, q.scalar_type());
  check_dtype(op, "draft_ids", draft_ids, at::kLong);
  check_dtype(op, "uniforms", uniforms, at::kFloat);
  const int64_t batch = draft_ids.size(0), k = draft_ids.size(1), vocab = q.size(2);
  DREAMR_CHECK(k >= 1, op, ": draft_ids must hold at least one drafted token per row, got shape ", draft_ids.sizes());
  DREAMR_CHECK(q.size(0) == batch && q.size(1) == k, op, ": draft_probs must be [B, K, V] = [", batch, ", ", k,
               ", V], got shape ", q.sizes());
  DREAMR_CHECK(p.size(0) == batch && p.size(1) == k + 1 && p.size(2) == vocab, op,
               ": target_probs must be [B, K + 1, V] = [", batch, ", ", k + 1, ", ", vocab, "], got shape ", p.sizes());
  DREAMR_CHECK(uniforms.size(0) == batch && uniforms.size(1) == k + 1, op, ": uniforms must be [B, K + 1] = [", batch,
               ", ", k + 1, "], got shape ", uniforms.sizes());
  return SamplingShape{batch, k, vocab};
}

inline SamplingShape check_greedy_inputs(const at::Tensor& draft_ids, const at::Tensor& logits) {
  const char* op = "greedy_verify";
  DREAMR_CHECK(draft_ids.defined() && draft_ids.dim() == 2, op, ": draft_ids must be [B, K], got shape ",
               draft_ids.defined() ? draft_ids.sizes() : at::IntArrayRef{});
  check_tensor(op, "draft_ids", draft_ids, 2, draft_ids.device());
  check_tensor(op, "target_logits", logits, 3, draft_ids.device());
  check_dtype(op, "draft_ids", draft_ids, at::kLong);
  DREAMR_CHECK(is_float_type(logits.scalar_type()), op, ": target_logits must be a float tensor, got ",
               dtype_name(logits.scalar_type()));
  const int64_t batch = draft_ids.size(0), k = draft_ids.size(1);
  DREAMR_CHECK(logits.size(0) == batch && logits.size(1) == k + 1 && logits.size(2) >= 1, op,
               ": target_logits must be [B, K + 1, V] = [", batch, ", ", k + 1, ", V], got shape ", logits.sizes());
  return SamplingShape{batch, k, logits.size(2)};
}

// Token ids read on the host (CPU tensors only): every drafted id must be in [0, V).
inline void check_token_ids(const char* op, const int64_t* ids, int64_t count, int64_t vocab) {
  for (int64_t i = 0; i < count; ++i) {
    DREAMR_CHECK(ids[i] >= 0 && ids[i] < vocab, op, ": draft_ids holds ", ids[i], " at flat index ", i,
                 ", outside the vocabulary [0, ", vocab, ")");
  }
}

}  // namespace dreamr
