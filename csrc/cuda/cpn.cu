// CUDA CPN verification: one block per verdict position. Each warp computes the dot products of the
// hidden row with some of the |P| + |N| verdict rows of the LM head (the rows stay in L2 across
// blocks); the block then combines the logits into cpn and the acceptance flag. One launch; the verdict
// ids travel in the kernel's parameters, so nothing is copied from the host.
#include "common.cuh"

namespace dreamr {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cpn_verify_kernel(const scalar_t* __restrict__ hidden, const scalar_t* __restrict__ weight,
                      const scalar_t* __restrict__ bias, int64_t hidden_size, VerdictIds ids, float alpha,
                      float softcap, float* __restrict__ cpn, bool* __restrict__ accept) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  __shared__ acc_t logits[2 * kMaxVerdictIds];
  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const scalar_t* h = hidden + row * hidden_size;
  const int count = ids.num_positive + ids.num_negative;
  for (int k = warp; k < count; k += kWarps) {
    const int64_t token = verdict_token(ids, k);
    const scalar_t* w = weight + token * hidden_size;
    acc_t sum = 0;
    for (int64_t i = lane; i < hidden_size; i += 32) {
      sum += to_acc<acc_t>(h[i]) * to_acc<acc_t>(w[i]);
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      if (bias != nullptr) sum += to_acc<acc_t>(bias[token]);
      logits[k] = cap_logit<acc_t>(sum, softcap);  // NaN for a non-finite raw logit, capped or not
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const float c = cpn_from_logits<acc_t>(logits, ids.num_positive, ids.num_negative);
    cpn[row] = c;
    accept[row] = accepts(c, alpha);
  }
}

__global__ void window_accept_kernel(const float* __restrict__ cpn, const bool* __restrict__ valid, int64_t requests,
                                     int64_t window, float alpha, int64_t* __restrict__ num_accepted,
                                     bool* __restrict__ accept) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= requests) return;
  num_accepted[r] = window_accept_row(cpn + r * window, valid + r * window, window, alpha, accept + r * window);
}

}  // namespace
}  // namespace dreamr

extern "C" cudaError_t dreamr_cpn_verify_cuda(const void* hidden, const void* weight, const void* bias, int64_t batch,
                                              int64_t hidden_size, DreamrDType dtype, dreamr::VerdictIds ids,
                                              float alpha, float softcap, float* cpn, bool* accept,
                                              cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return dreamr::dispatch_float(dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    dreamr::cpn_verify_kernel<scalar_t><<<dreamr::blocks_for(batch), dreamr::kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(hidden), static_cast<const scalar_t*>(weight),
        static_cast<const scalar_t*>(bias), hidden_size, ids, alpha, softcap, cpn, accept);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t dreamr_cpn_window_accept_cuda(const float* cpn, const bool* valid, int64_t requests,
                                                     int64_t window, float alpha, int64_t* num_accepted, bool* accept,
                                                     cudaStream_t stream) {
  if (requests == 0) return cudaSuccess;
  constexpr int threads = 128;
  const unsigned blocks = static_cast<unsigned>((requests + threads - 1) / threads);
  dreamr::window_accept_kernel<<<blocks, threads, 0, stream>>>(cpn, valid, requests, window, alpha, num_accepted,
                                                               accept);
  return cudaGetLastError();
}
