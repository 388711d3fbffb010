// CPN verification (DREAM-R's TBVM acceptance rule) from the target's hidden states.
//
//   cpn = s+ / (s+ + s-) = sigmoid(logsumexp(l[P]) - logsumexp(l[N])),  l = W h + b (optionally soft-capped)
//
// The softmax denominator over the vocabulary cancels, so only the |P| + |N| verdict rows of the LM
// head are ever touched: O(B (|P| + |N|) H) work instead of O(B V H), and no [B, V] buffer.
#pragma once

#include "dreamr/common.h"

namespace dreamr {

using std::exp;
using std::isfinite;
using std::log;
using std::tanh;

// Token ids of positive and negative verdicts; checked on the host (in range, no repeats, disjoint).
struct VerdictIds {
  int32_t positive[kMaxVerdictIds];
  int32_t negative[kMaxVerdictIds];
  int32_t num_positive;
  int32_t num_negative;
};

// Token id of verdict slot k: the positives first, then the negatives (the order of the logits below).
DREAMR_HOST_DEVICE int64_t verdict_token(const VerdictIds& ids, int k) {
  return k < ids.num_positive ? ids.positive[k] : ids.negative[k - ids.num_positive];
}

// One verdict logit: soft-capping as in Gemma 2 (cap * tanh(l / cap)) where cap > 0. A non-finite raw
// logit stays NaN: tanh would turn +-inf into +-cap and hide a broken hidden state from cpn_from_logits.
template <typename acc_t>
DREAMR_HOST_DEVICE acc_t cap_logit(acc_t logit, float softcap) {
  if (!isfinite(logit)) return static_cast<acc_t>(NAN);
  if (softcap > 0.f) return static_cast<acc_t>(softcap) * tanh(logit / static_cast<acc_t>(softcap));
  return logit;
}

// cpn from the verdict logits: logits[0, num_positive) are positive, the next num_negative negative.
// Any non-finite logit gives NaN (the step is then rejected by accepts()).
template <typename acc_t>
DREAMR_HOST_DEVICE float cpn_from_logits(const acc_t* logits, int num_positive, int num_negative) {
  const int count = num_positive + num_negative;
  for (int k = 0; k < count; ++k) {
    if (!isfinite(logits[k])) return NAN;
  }
  auto logsumexp = [](const acc_t* x, int n) {
    acc_t hi = x[0];
    for (int k = 1; k < n; ++k) hi = x[k] > hi ? x[k] : hi;
    acc_t sum = 0;
    for (int k = 0; k < n; ++k) sum += exp(x[k] - hi);
    return hi + log(sum);
  };
  const acc_t margin = logsumexp(logits, num_positive) - logsumexp(logits + num_positive, num_negative);
  return static_cast<float>(acc_t(1) / (acc_t(1) + exp(-margin)));
}

// Dot product of one hidden row with one weight row, accumulated in acc_t. Eight independent partial
// sums let the compiler vectorise the loop without -ffast-math.
template <typename scalar_t, typename acc_t>
inline acc_t dot_row(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      partial[j] += static_cast<acc_t>(a[i + j]) * static_cast<acc_t>(b[i + j]);
    }
  }
  acc_t sum = 0;
  for (; i < n; ++i) sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  for (int j = 0; j < 8; ++j) sum += partial[j];
  return sum;
}

// The epilogue for one row, from its raw verdict logits (W h + b, positives first): soft-capping, the
// two log-sum-exps, the sigmoid and the threshold. `logits` is overwritten with the capped values (NaN
// where the raw logit was not finite, so an infinite hidden state is rejected even with soft-capping).
template <typename acc_t>
inline void cpn_epilogue_row(acc_t* logits, const VerdictIds& ids, float alpha, float softcap, float* cpn,
                             bool* accept) {
  const int count = ids.num_positive + ids.num_negative;
  for (int k = 0; k < count; ++k) logits[k] = cap_logit<acc_t>(logits[k], softcap);
  *cpn = cpn_from_logits<acc_t>(logits, ids.num_positive, ids.num_negative);
  *accept = accepts(*cpn, alpha);
}

// Plain C++ kernel for one row b (dot products then the epilogue), for C++ users without a BLAS. The
// torch CPU op instead computes the [B, |P|+|N|] logits with one BLAS matrix product over the gathered
// verdict rows and runs cpn_epilogue_row on them: a hand-written loop cannot match the vendor GEMM.
template <typename scalar_t, typename acc_t>
inline void cpn_verify_row_cpu(const scalar_t* hidden, const scalar_t* weight, const scalar_t* bias,
                               int64_t hidden_size, const VerdictIds& ids, float alpha, float softcap,
                               float* cpn, bool* accept) {
  acc_t logits[2 * kMaxVerdictIds];
  const int count = ids.num_positive + ids.num_negative;
  for (int k = 0; k < count; ++k) {
    const int64_t token = verdict_token(ids, k);
    acc_t logit = dot_row<scalar_t, acc_t>(hidden, weight + token * hidden_size, hidden_size);
    if (bias != nullptr) logit += static_cast<acc_t>(bias[token]);
    logits[k] = logit;
  }
  cpn_epilogue_row<acc_t>(logits, ids, alpha, softcap, cpn, accept);
}

// Window form for one request: accept flags per slot and the length of the leading accepted run.
DREAMR_HOST_DEVICE int64_t window_accept_row(const float* cpn, const bool* valid, int64_t window, float alpha,
                                             bool* accept) {
  int64_t leading = 0;
  bool still_leading = true;
  for (int64_t w = 0; w < window; ++w) {
    accept[w] = valid[w] && accepts(cpn[w], alpha);
    still_leading = still_leading && accept[w];
    leading += still_leading ? 1 : 0;
  }
  return leading;
}

}  // namespace dreamr
