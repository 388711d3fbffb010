// CUDA token-level speculative sampling and greedy verification: one block per row.
// Sampling: thread 0 runs the (at most K) acceptance tests; then the block draws the extra token by
// inverse CDF over V: per-thread partial sums of contiguous chunks (in double), an exclusive block scan,
// and the one thread whose chunk holds u * total walks it. Greedy: a block argmax per position, stopping
// at the first mismatch.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace dreamr {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    speculative_sample_kernel(const scalar_t* __restrict__ q, const int64_t* __restrict__ draft_ids,
                              const scalar_t* __restrict__ p, const float* __restrict__ uniforms, SamplingShape s,
                              int64_t* __restrict__ tokens, int64_t* __restrict__ num_accepted) {
  using Scan = cub::BlockScan<double, kThreads>;
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } temp;
  __shared__ int64_t accepted;
  __shared__ double total_shared;
  __shared__ int64_t found;

  const int64_t b = blockIdx.x, k_len = s.draft_len, v_len = s.vocab;
  if (threadIdx.x == 0) {
    const int64_t n = count_accepted(q, draft_ids, p, uniforms, s, b);
    accepted = n;
    found = -1;
  }
  __syncthreads();
  const int64_t n = accepted;
  for (int64_t i = threadIdx.x; i <= k_len; i += kThreads) {
    tokens[b * (k_len + 1) + i] = i < n ? draft_ids[b * k_len + i] : -1;
  }
  const scalar_t* p_row = p + (b * (k_len + 1) + n) * v_len;
  const scalar_t* q_row = n < k_len ? q + (b * k_len + n) * v_len : nullptr;

  // Each thread owns a contiguous chunk of the vocabulary, so the scan order matches a sequential sum.
  const int64_t chunk = (v_len + kThreads - 1) / kThreads;
  const int64_t lo = threadIdx.x * chunk, hi = lo + chunk < v_len ? lo + chunk : v_len;
  bool use_p = false;
  double local = 0.0;
  for (int64_t v = lo; v < hi; ++v) local += extra_token_weight(p_row, q_row, v, false);
  double total = Reduce(temp.reduce).Sum(local);
  if (threadIdx.x == 0) total_shared = total;
  __syncthreads();
  if (!(total_shared > 0.0)) {  // p == q exactly: the residual is empty, draw from p
    use_p = true;
    local = 0.0;
    for (int64_t v = lo; v < hi; ++v) local += extra_token_weight(p_row, q_row, v, true);
    total = Reduce(temp.reduce).Sum(local);
    if (threadIdx.x == 0) total_shared = total;
  }
  __syncthreads();
  double before = 0.0;
  Scan(temp.scan).ExclusiveSum(local, before);
  const double target = static_cast<double>(uniforms[b * (k_len + 1) + k_len]) * total_shared;
  if (before <= target && target < before + local) {
    double cumulative = before;
    for (int64_t v = lo; v < hi; ++v) {
      const double w = extra_token_weight(p_row, q_row, v, use_p);
      if (w <= 0.0) continue;
      cumulative += w;
      if (cumulative > target) {
        found = v;
        break;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t token = found;
    if (token < 0) {  // u * total rounded up to total: take the last token with positive weight
      for (int64_t v = v_len - 1; v >= 0; --v) {
        if (extra_token_weight(p_row, q_row, v, use_p) > 0.0) {
          token = v;
          break;
        }
      }
      token = token < 0 ? 0 : token;
    }
    tokens[b * (k_len + 1) + n] = token;
    num_accepted[b] = n;
  }
}

// Block argmax, the first index on ties (as torch.argmax).
struct ArgMax {
  float value;
  int64_t index;
};
struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    const bool a_nan = a.value != a.value, b_nan = b.value != b.value;
    if (a_nan || b_nan) return a_nan && (!b_nan || a.index < b.index) ? a : b;
    if (a.value != b.value) return a.value > b.value ? a : b;
    return a.index < b.index ? a : b;
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    greedy_verify_kernel(const int64_t* __restrict__ draft_ids, const scalar_t* __restrict__ logits, SamplingShape s,
                         int64_t* __restrict__ tokens, int64_t* __restrict__ num_accepted) {
  using Reduce = cub::BlockReduce<ArgMax, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ bool stop;
  const int64_t b = blockIdx.x, k_len = s.draft_len, v_len = s.vocab;
  for (int64_t i = threadIdx.x; i <= k_len; i += kThreads) tokens[b * (k_len + 1) + i] = -1;
  for (int64_t n = 0; n <= k_len; ++n) {
    const scalar_t* row = logits + (b * (k_len + 1) + n) * v_len;
    ArgMax best{-INFINITY, v_len};
    for (int64_t v = threadIdx.x; v < v_len; v += kThreads) best = ArgMaxOp()(best, ArgMax{to_acc<float>(row[v]), v});
    best = Reduce(temp).Reduce(best, ArgMaxOp());
    if (threadIdx.x == 0) {
      const int64_t token = best.index < v_len ? best.index : 0;
      tokens[b * (k_len + 1) + n] = token;
      stop = n == k_len || token != draft_ids[b * k_len + n];
      if (stop) num_accepted[b] = n;
    }
    __syncthreads();
    if (stop) break;
    __syncthreads();  // everyone has read `stop` and the reduction storage before the next round
  }
}

}  // namespace
}  // namespace dreamr

extern "C" cudaError_t dreamr_speculative_sample_cuda(const void* draft_probs, const int64_t* draft_ids,
                                                      const void* target_probs, const float* uniforms,
                                                      dreamr::SamplingShape shape, DreamrDType dtype, int64_t* tokens,
                                                      int64_t* num_accepted, cudaStream_t stream) {
  if (shape.batch == 0) return cudaSuccess;
  if (dtype == kDreamrFloat64) return cudaErrorInvalidValue;
  return dreamr::dispatch_float(dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    dreamr::speculative_sample_kernel<scalar_t><<<dreamr::blocks_for(shape.batch), dreamr::kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(draft_probs), draft_ids, static_cast<const scalar_t*>(target_probs), uniforms,
        shape, tokens, num_accepted);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t dreamr_greedy_verify_cuda(const int64_t* draft_ids, const void* target_logits,
                                                 dreamr::SamplingShape shape, DreamrDType dtype, int64_t* tokens,
                                                 int64_t* num_accepted, cudaStream_t stream) {
  if (shape.batch == 0) return cudaSuccess;
  return dreamr::dispatch_float(dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    dreamr::greedy_verify_kernel<scalar_t><<<dreamr::blocks_for(shape.batch), dreamr::kThreads, 0, stream>>>(
        draft_ids, static_cast<const scalar_t*>(target_logits), shape, tokens, num_accepted);
    return cudaGetLastError();
  });
}
