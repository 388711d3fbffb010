// C++ unit tests of the header-only CPU kernels, against naive double-precision computations.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "dreamr/cpn.h"
#include "dreamr/cpn_bf16_x86.h"
#include "dreamr/rollback.h"
#include "dreamr/sampling.h"

static int failures = 0;
#define EXPECT(cond)                                                 \
  do {                                                               \
    if (!(cond)) {                                                   \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                    \
    }                                                                \
  } while (0)

static void test_cpn_matches_softmax_ratio() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  const int64_t hidden = 37, vocab = 50;
  std::vector<float> h(hidden), w(vocab * hidden), bias(vocab);
  for (auto& x : h) x = normal(rng) * 0.3f;
  for (auto& x : w) x = normal(rng);
  for (auto& x : bias) x = normal(rng);
  dreamr::VerdictIds ids{};
  ids.positive[0] = 3;
  ids.positive[1] = 7;
  ids.negative[0] = 11;
  ids.num_positive = 2;
  ids.num_negative = 1;
  // Naive: full-vocabulary softmax, then the ratio of the two sets' masses.
  std::vector<double> logits(vocab);
  double max_logit = -1e300, denominator = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    double l = bias[v];
    for (int64_t i = 0; i < hidden; ++i) l += double(h[i]) * w[v * hidden + i];
    logits[v] = l;
    max_logit = std::max(max_logit, l);
  }
  for (double l : logits) denominator += std::exp(l - max_logit);
  auto prob = [&](int v) { return std::exp(logits[v] - max_logit) / denominator; };
  const double s_pos = prob(3) + prob(7), s_neg = prob(11);
  const double expected = s_pos / (s_pos + s_neg);
  float cpn = 0;
  bool accept = false;
  dreamr::cpn_verify_row_cpu<float, float>(h.data(), w.data(), bias.data(), hidden, ids, 0.5f, 0.f, &cpn, &accept);
  EXPECT(std::fabs(cpn - expected) < 1e-5);
  EXPECT(accept == (expected > 0.5));
}

static void test_accept_rule_ends() {
  EXPECT(dreamr::accepts(0.f, 0.f));
  EXPECT(!dreamr::accepts(1.f, 1.f));
  EXPECT(!dreamr::accepts(NAN, 0.f));
  EXPECT(dreamr::accepts(0.71f, 0.7f) && !dreamr::accepts(0.7f, 0.7f));
  // alpha >= 1 rejects explicitly, not through cpn <= 1: a cpn above 1 (a caller's value) is refused too.
  EXPECT(!dreamr::accepts(1.5f, 1.f) && !dreamr::accepts(INFINITY, 1.f) && !dreamr::accepts(2.f, 1.5f));
}

static void test_window_leading_run() {
  const float cpn[4] = {0.9f, 0.8f, 0.1f, 0.95f};
  const bool valid[4] = {true, true, true, true};
  bool accept[4];
  EXPECT(dreamr::window_accept_row(cpn, valid, 4, 0.7f, accept) == 2);
  EXPECT(accept[3] && !accept[2]);
}

static void test_rollback_truncate_and_copy() {
  const dreamr::RollbackShape shape{2, 1, 6, 2, 12, 12, 2};  // B, H, T, D, then strides (dense)
  std::vector<float> cache(2 * 6 * 2);
  for (size_t i = 0; i < cache.size(); ++i) cache[i] = float(i + 1);
  const int64_t lengths[2] = {2, 4}, src_row[2] = {1, -1}, src_start[2] = {1, 0}, copy_length[2] = {3, 0};
  const int64_t longest = dreamr::longest_new_length(shape, lengths, src_row, src_start, copy_length);
  EXPECT(longest == 5);
  for (int64_t b = 0; b < 2; ++b) {
    const dreamr::RowPlan plan = dreamr::plan_row(b, shape, lengths, src_row, src_start, copy_length);
    dreamr::rollback_row_cpu(reinterpret_cast<char*>(cache.data()), sizeof(float), shape, b, plan, longest);
  }
  // Row 0: positions 0-1 kept, 2-4 from row 1's positions 1-3, position 5 (past the longest) untouched.
  for (int t = 0; t < 6; ++t) {
    for (int d = 0; d < 2; ++d) {
      const float got = cache[t * 2 + d];
      const float want = (t < 2 || t == 5) ? float(t * 2 + d + 1) : float(12 + (t - 1) * 2 + d + 1);
      EXPECT(got == want);
    }
  }
  // Row 1: truncated to 4, position 4 zeroed (below the longest), position 5 untouched.
  EXPECT(cache[12 + 4 * 2] == 0.f && cache[12 + 5 * 2] == float(12 + 5 * 2 + 1));
}

static void test_infinite_logit_is_rejected_with_softcap() {
  // tanh would map an infinite raw logit to +-cap; the epilogue must still give NaN and reject.
  dreamr::VerdictIds ids{};
  ids.positive[0] = 0;
  ids.negative[0] = 1;
  ids.num_positive = ids.num_negative = 1;
  for (const float softcap : {0.f, 30.f}) {
    for (const float bad : {INFINITY, -INFINITY, NAN}) {
      float logits[2] = {bad, 0.f};
      float cpn = 0.f;
      bool accept = true;
      dreamr::cpn_epilogue_row<float>(logits, ids, 0.f, softcap, &cpn, &accept);
      EXPECT(std::isnan(cpn) && !accept);
    }
  }
}

static void test_rollback_invalid_device_plans_copy_nothing() {
  // What a device-held plan gets where the host check would refuse it: no copy instead of a race.
  const dreamr::RollbackShape shape{3, 1, 6, 2, 12, 12, 2};
  const int64_t lengths[3] = {2, 4, 3};
  const int64_t self_copy[3] = {0, -1, -1}, starts[3] = {0, 0, 0}, lens[3] = {2, 0, 0};
  EXPECT(dreamr::plan_row(0, shape, lengths, self_copy, starts, lens).copied == 0);
  const int64_t chained[3] = {1, 2, -1};  // row 1 is row 0's source and also receives a copy
  const dreamr::RowPlan p0 = dreamr::plan_row(0, shape, lengths, chained, starts, lens);
  EXPECT(p0.src_row == -1 && p0.copied == 0);
  // A span past what the source keeps is clipped to it (those positions are being zeroed).
  const int64_t src[3] = {1, -1, -1}, start[3] = {3, 0, 0}, n[3] = {3, 0, 0};
  const dreamr::RowPlan clipped = dreamr::plan_row(0, shape, lengths, src, start, n);
  EXPECT(clipped.src_row == 1 && clipped.src_start == 3 && clipped.copied == 1);
}

static void test_compact_in_place_equals_a_gather_from_a_copy() {
  // 4 rows, 2 heads, 8 positions, D = 3: row 0 stays and closes a gap within itself (its positions 0-1
  // are already in place, 3-5 move left onto their own row), row 1 is released, rows 2 and 3 move up
  // (row 3 left-aligned); once dense, once with the time axis strided (a cropped view).
  for (const int64_t stride_time : {int64_t{3}, int64_t{4}}) {
    const int64_t B = 4, H = 2, T = 8, D = 3, R = 3, W = 5;
    const dreamr::RollbackShape shape{B, H, T, D, H * T * stride_time, T * stride_time, stride_time};
    std::vector<float> cache(B * H * T * stride_time);
    for (size_t i = 0; i < cache.size(); ++i) cache[i] = float(i + 1);
    const std::vector<float> before = cache;
    const int64_t src_rows[R] = {0, 2, 3}, counts[R] = {5, 4, 3};
    const int64_t columns[R * W] = {0, 1, 3, 4, 5,     // row 0 loses column 2 (a private verdict token)
                                    0, 1, 2, 3, -9,    // row 2 whole; padding never read
                                    2, 6, 7, -9, -9};  // row 3's entries at 2, 6, 7
    const dreamr::CompactPlan plan{R, W, src_rows, columns, counts};
    EXPECT(dreamr::longest_count(plan) == 5);
    for (int64_t h = 0; h < H; ++h) {
      dreamr::compact_head_cpu(reinterpret_cast<char*>(cache.data()), sizeof(float), shape, h, plan, 5);
    }
    auto at = [&](const std::vector<float>& c, int64_t b, int64_t h, int64_t t, int64_t d) {
      return c[b * shape.stride_batch + h * shape.stride_head + t * stride_time + d];
    };
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t i = 0; i < R; ++i) {
          for (int64_t j = 0; j < W; ++j) {  // a gather from the cache as it was, zeros past each count
            const float want = j < counts[i] ? at(before, src_rows[i], h, columns[i * W + j], d) : 0.f;
            EXPECT(at(cache, i, h, j, d) == want);
          }
          for (int64_t t = W; t < T; ++t) EXPECT(at(cache, i, h, t, d) == at(before, i, h, t, d));  // past the longest
        }
        for (int64_t t = 0; t < T; ++t) EXPECT(at(cache, 3, h, t, d) == at(before, 3, h, t, d));  // past the plan
      }
    }
  }
}

static void test_compact_device_plans_stay_in_bounds() {
  // Out-of-range values (what only an unchecked device-held plan can hold) are clamped into the cache.
  const dreamr::RollbackShape shape{2, 1, 4, 1, 4, 4, 1};
  const int64_t src_rows[2] = {-3, 7}, counts[2] = {9, -1}, columns[2 * 2] = {-5, 99, 0, 0};
  const dreamr::CompactPlan plan{2, 2, src_rows, columns, counts};
  EXPECT(dreamr::compact_source_row(plan, shape, 0) == 0 && dreamr::compact_source_row(plan, shape, 1) == 1);
  EXPECT(dreamr::compact_count(plan, 0) == 2 && dreamr::compact_count(plan, 1) == 0);
  EXPECT(dreamr::compact_column(plan, shape, 0, 0) == 0 && dreamr::compact_column(plan, shape, 0, 1) == 3);
  EXPECT(dreamr::longest_count(plan) == 2);
}

static void test_extra_token_is_drawn_from_residual() {
  const float p[4] = {0.0f, 0.5f, 0.5f, 0.0f}, q[4] = {0.25f, 0.25f, 0.25f, 0.25f};
  // Residual max(0, p - q) = {0, .25, .25, 0}: u < 0.5 gives token 1, else token 2.
  EXPECT(dreamr::draw_extra_token_cpu(p, q, 4, 0.1f) == 1);
  EXPECT(dreamr::draw_extra_token_cpu(p, q, 4, 0.6f) == 2);
  EXPECT(dreamr::draw_extra_token_cpu(p, q, 4, 0.9999999f) == 2);
  EXPECT(dreamr::draw_extra_token_cpu(p, p, 4, 0.1f) == 1);  // p == q: the residual is empty, draw from p
}


// bf16 bits of a float (truncation is fine: the test compares against the same bf16 values widened).
static uint16_t to_bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

static float from_bf16_bits(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

static void test_bf16_verdict_logits_are_float_dot_products() {
  if (!dreamr::cpu_has_avx512_bf16()) {
    std::printf("kernels_cpu: no AVX512-BF16 on this CPU, bf16 verdict-logit kernel not run\n");
    return;
  }
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int64_t hidden_size : {1, 31, 32, 33, 100, 4096}) {
    for (int64_t batch : {1, 5}) {
      const int64_t vocab = 20, count = 3;
      std::vector<uint16_t> h(batch * hidden_size), w(vocab * hidden_size);
      for (auto& x : h) x = to_bf16_bits(normal(rng));
      for (auto& x : w) x = to_bf16_bits(normal(rng));
      const int64_t ids[count] = {19, 0, 7};
      std::vector<float> logits(batch * count, -1.f);
      dreamr::verdict_logits_bf16(h.data(), hidden_size, w.data(), hidden_size, ids, count, hidden_size, 0, batch,
                                  logits.data());
      for (int64_t r = 0; r < batch; ++r) {
        for (int64_t k = 0; k < count; ++k) {
          double want = 0;
          for (int64_t i = 0; i < hidden_size; ++i) {
            want += double(from_bf16_bits(h[r * hidden_size + i])) * from_bf16_bits(w[ids[k] * hidden_size + i]);
          }
          EXPECT(std::fabs(logits[r * count + k] - want) <= 1e-4 * (1.0 + std::sqrt(double(hidden_size))));
        }
      }
    }
  }
}

int main() {
  test_cpn_matches_softmax_ratio();
  test_accept_rule_ends();
  test_window_leading_run();
  test_rollback_truncate_and_copy();
  test_extra_token_is_drawn_from_residual();
  test_infinite_logit_is_rejected_with_softcap();
  test_rollback_invalid_device_plans_copy_nothing();
  test_compact_in_place_equals_a_gather_from_a_copy();
  test_compact_device_plans_stay_in_bounds();
  test_bf16_verdict_logits_are_float_dot_products();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("kernels_cpu: all checks passed\n");
  return 0;
}
