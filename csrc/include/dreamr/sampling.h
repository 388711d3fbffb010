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
    // In double, so the product rounds exactly as the reference's Python floats do.
    const double qx = static_cast<float>(q[(b * k_len + n) * v_len + x]);
    const double px = static_cast<float>(p[(b * (k_len + 1) + n) * v_len + x]);
    if (!(static_cast<double>(uniforms[b * (k_len + 1) + n]) * qx < px)) break;
    ++n;
  }
  return n;
}

// Weight of token v in the distribution the extra token is drawn from. At position n < K it is the
// residual max(0, p - q); where p == q exactly the residual is empty and p itself is used (use_p).
template <typename scalar_t>
DREAMR_HOST_DEVICE double extra_token_weight(const scalar_t* p_row, const scalar_t* q_row, int64_t v, bool use_p) {
  const double pv = static_cast<double>(static_cast<float>(p_row[v]));
  if (use_p || q_row == nullptr) return pv;
  const double r = pv - static_cast<double>(static_cast<float>(q_row[v]));
  return r > 0.0 ? r : 0.0;
}

// CPU: inverse-CDF draw over V, summing sequentially in double (as the reference does).
template <typename scalar_t>
inline int64_t draw_extra_token_cpu(const scalar_t* p_row, const scalar_t* q_row, int64_t vocab, float u) {
  double total = 0.0;
  for (int64_t v = 0; v < vocab; ++v) total += extra_token_weight(p_row, q_row, v, false);
  const bool use_p = !(total > 0.0);
  if (use_p) {
    total = 0.0;
    for (int64_t v = 0; v < vocab; ++v) total += extra_token_weight(p_row, q_row, v, true);
  }
  const double target = static_cast<double>(u) * total;
  double cumulative = 0.0;
  int64_t last_positive = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    const double w = extra_token_weight(p_row, q_row, v, use_p);
    if (w <= 0.0) continue;
    last_positive = v;
    cumulative += w;
    if (cumulative > target) return v;
  }
  return last_positive;  // u * total rounded up to total
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

// Index of the largest value, the first one on ties (as torch.argmax); NaN counts as largest.
template <typename scalar_t>
inline int64_t argmax_cpu(const scalar_t* row, int64_t n) {
  int64_t best = 0;
  float best_value = static_cast<float>(row[0]);
  for (int64_t i = 1; i < n; ++i) {
    const float x = static_cast<float>(row[i]);
    if (best_value != best_value) break;
    if (x > best_value || x != x) {
      best = i;
      best_value = x;
    }
  }
  return best;
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
