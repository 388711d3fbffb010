// Token-level speculative sampling, chain form (Leviathan et al. 2023), and its greedy variant.
//
// Randomness comes in as explicit uniforms [B, K + 1] (drawn by the caller from a seeded generator):
// uniforms[b, k] < 1 decides draft token k (accept iff u * q(x) < p(x), i.e. with probability
// min(1, p/q)); uniforms[b, K] draws the extra token by inverse CDF, from norm(max(0, p - q)) at the
// first rejection or from p at position K (the bonus token). Explicit uniforms make every device and the
// reference produce the same tokens for the same seed.
#pragma once

#include "dreamr/common.h"

namespace dreamr {

struct SamplingShape {
  int64_t batch, draft_len, vocab;  // B, K, V
};

// Leading accepted draft tokens of row b.
template <typename scalar_t>
DREAMR_HOST_DEVICE int64_t count_accepted(const scalar_t* q, const int64_t* draft_ids, const scalar_t* p,
                                          const float* uniforms, const SamplingShape& s, int64_t b) {
  const int64_t k_len = s.draft_len, v_len = s.vocab;
  int64_t n = 0;
  while (n < k_len) {
    const int64_t x = draft_ids[b * k_len + n];
    if (x < 0 || x >= v_len) break;  // checked on the host for CPU tensors; device tensors reject instead
    // In double, so the product rounds exactly as the reference's Python floats do.
    const double qx = to_float(q[(b * k_len + n) * v_len + x]);
    const double px = to_float(p[(b * (k_len + 1) + n) * v_len + x]);
    if (!(static_cast<double>(uniforms[b * (k_len + 1) + n]) * qx < px)) break;
    ++n;
  }
  return n;
}

// Weight of token v in the distribution the extra token is drawn from. At position n < K it is the
// residual max(0, p - q); where p == q exactly the residual is empty and p itself is used (use_p).
template <typename scalar_t>
DREAMR_HOST_DEVICE double extra_token_weight(const scalar_t* p_row, const scalar_t* q_row, int64_t v, bool use_p) {
  const double pv = static_cast<double>(to_float(p_row[v]));
  if (use_p || q_row == nullptr) return pv;
  const double r = pv - static_cast<double>(to_float(q_row[v]));
  return r > 0.0 ? r : 0.0;
}

// CPU: sum of the draw's weights over [begin, end) (a chunk of at most a few hundred tokens), with
// eight float partial sums and the p-or-residual choice hoisted out of the loop, so it vectorises.
// Chunk sums are added up in double; the grouping can move an inverse-CDF boundary by about 1e-7 of
// the total against the reference's sequential double sum.
template <bool kUseP, typename scalar_t>
inline double chunk_weight_sum(const scalar_t* p_row, const scalar_t* q_row, int64_t begin, int64_t end) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t v = begin;
  for (; v + 8 <= end; v += 8) {
    for (int j = 0; j < 8; ++j) {
      const float pv = static_cast<float>(p_row[v + j]);
      if constexpr (kUseP) {
        partial[j] += pv;
      } else {
        const float r = pv - static_cast<float>(q_row[v + j]);
        partial[j] += r > 0.f ? r : 0.f;
      }
    }
  }
  double sum = 0.0;
  for (int j = 0; j < 8; ++j) sum += partial[j];
  for (; v < end; ++v) sum += extra_token_weight(p_row, q_row, v, kUseP);
  return sum;
}

// CPU: inverse-CDF draw over V: the smallest v whose cumulative weight exceeds u * total. Sums the
// vocabulary chunk by chunk, then steps token by token only inside the chunk where the cumulative
// weight crosses the target.
template <bool kUseP, typename scalar_t>
inline int64_t draw_from_weights_cpu(const scalar_t* p_row, const scalar_t* q_row, int64_t vocab, double total, float u) {
  constexpr int64_t kChunk = 256;
  const double target = static_cast<double>(u) * total;
  double cumulative = 0.0;
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int64_t end = begin + kChunk < vocab ? begin + kChunk : vocab;
    const double chunk = chunk_weight_sum<kUseP>(p_row, q_row, begin, end);
    if (cumulative + chunk <= target) {
      cumulative += chunk;
      continue;
    }
    for (int64_t v = begin; v < end; ++v) {
      const double w = extra_token_weight(p_row, q_row, v, kUseP);
      cumulative += w;
      if (w > 0.0 && cumulative > target) return v;
    }
  }
  for (int64_t v = vocab - 1; v > 0; --v) {  // u * total rounded up to the total: last positive weight
    if (extra_token_weight(p_row, q_row, v, kUseP) > 0.0) return v;
  }
  return 0;
}

template <bool kUseP, typename scalar_t>
inline double total_weight_cpu(const scalar_t* p_row, const scalar_t* q_row, int64_t vocab) {
  constexpr int64_t kChunk = 256;
  double total = 0.0;
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    total += chunk_weight_sum<kUseP>(p_row, q_row, begin, begin + kChunk < vocab ? begin + kChunk : vocab);
  }
  return total;
}

// CPU: the extra token, from the residual max(0, p - q) (q_row given) or from p (q_row null, or p == q
// exactly so that the residual is empty).
template <typename scalar_t>
inline int64_t draw_extra_token_cpu(const scalar_t* p_row, const scalar_t* q_row, int64_t vocab, float u) {
  if (q_row != nullptr) {
    const double total = total_weight_cpu<false>(p_row, q_row, vocab);
    if (total > 0.0) return draw_from_weights_cpu<false>(p_row, q_row, vocab, total, u);
  }
  return draw_from_weights_cpu<true>(p_row, q_row, vocab, total_weight_cpu<true>(p_row, q_row, vocab), u);
}

// CPU kernel for one row: tokens[b, :] (padded with -1) and the number accepted.
template <typename scalar_t>
inline int64_t speculative_sample_row_cpu(const scalar_t* q, const int64_t* draft_ids, const scalar_t* p,
                                          const float* uniforms, const SamplingShape& s, int64_t b,
                                          int64_t* tokens) {
  const int64_t k_len = s.draft_len, v_len = s.vocab;
  const int64_t n = count_accepted(q, draft_ids, p, uniforms, s, b);
  int64_t* out = tokens + b * (k_len + 1);
  for (int64_t i = 0; i <= k_len; ++i) out[i] = i < n ? draft_ids[b * k_len + i] : -1;
  const scalar_t* p_row = p + (b * (k_len + 1) + n) * v_len;
  const scalar_t* q_row = n < k_len ? q + (b * k_len + n) * v_len : nullptr;
  out[n] = draw_extra_token_cpu(p_row, q_row, v_len, uniforms[b * (k_len + 1) + k_len]);
  return n;
}

// Index of the largest value, the first one on ties (as torch.argmax); a NaN counts as largest, so the
// first NaN wins. One vectorisable pass finds the maximum (and whether any NaN is present), a second
// finds its first index.
template <typename scalar_t>
inline int64_t argmax_cpu(const scalar_t* row, int64_t n) {
  float lane_max[8], lane_nan[8];
  for (int j = 0; j < 8; ++j) lane_max[j] = -INFINITY, lane_nan[j] = 0.f;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const float x = static_cast<float>(row[i + j]);
      lane_max[j] = x > lane_max[j] ? x : lane_max[j];
      lane_nan[j] = x != x ? 1.f : lane_nan[j];
    }
  }
  float best = -INFINITY;
  bool any_nan = false;
  for (int j = 0; j < 8; ++j) best = lane_max[j] > best ? lane_max[j] : best, any_nan = any_nan || lane_nan[j] != 0.f;
  for (; i < n; ++i) {
    const float x = static_cast<float>(row[i]);
    best = x > best ? x : best;
    any_nan = any_nan || x != x;
  }
  for (int64_t k = 0; k < n; ++k) {
    const float x = static_cast<float>(row[k]);
    if (any_nan ? x != x : x == best) return k;
  }
  return 0;  // every value is -inf
}

// CPU kernel for greedy verification of one row.
template <typename scalar_t>
inline int64_t greedy_verify_row_cpu(const int64_t* draft_ids, const scalar_t* logits, const SamplingShape& s,
                                     int64_t b, int64_t* tokens) {
  const int64_t k_len = s.draft_len, v_len = s.vocab;
  int64_t* out = tokens + b * (k_len + 1);
  for (int64_t i = 0; i <= k_len; ++i) out[i] = -1;
  int64_t n = 0;
  for (;; ++n) {
    const int64_t best = argmax_cpu(logits + (b * (k_len + 1) + n) * v_len, v_len);
    out[n] = best;
    if (n == k_len || best != draft_ids[b * k_len + n]) break;
  }
  return n;
}

}  // namespace dreamr
