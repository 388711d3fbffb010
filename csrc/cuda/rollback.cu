// CUDA step-level KV-cache rollback: every layer's keys and values in one launch. Block (t, b, h)
// rewrites the tail of head h of row b in tensor t: the copied span from the source row, then zeros up
// to the longest new length in the batch (each block recomputes it from the B lengths: cheaper than a
// second launch, and needs no host read).
// Data moves in the widest word that divides one position's bytes (16 bytes for D * element_size % 16 == 0).
#include <cstdint>

#include "common.cuh"

namespace dreamr {
namespace {

constexpr int kThreads = 256;

template <typename word_t>
__global__ void __launch_bounds__(kThreads)
    kv_rollback_kernel(DreamrCachePointers cache, RollbackShape shape, int64_t words_per_position,
                       const int64_t* __restrict__ lengths, const int64_t* __restrict__ src_row,
                       const int64_t* __restrict__ src_start, const int64_t* __restrict__ copy_length,
                       int64_t* __restrict__ new_lengths) {
  const int64_t tensor = blockIdx.x, b = blockIdx.y, h = blockIdx.z;
  const RowPlan plan = plan_row(b, shape, lengths, src_row, src_start, copy_length);
  if (tensor == 0 && h == 0 && threadIdx.x == 0) new_lengths[b] = plan.keep + plan.copied;

  word_t* base = static_cast<word_t*>(cache.data[tensor]);
  word_t* dst = base + ((b * shape.heads + h) * shape.time) * words_per_position;
  const word_t* src = plan.copied > 0
                          ? base + ((plan.src_row * shape.heads + h) * shape.time + plan.src_start) * words_per_position
                          : nullptr;
  const int64_t first = plan.keep * words_per_position;
  const int64_t copied_end = (plan.keep + plan.copied) * words_per_position;
  const int64_t end = longest_new_length(shape, lengths, src_row, src_start, copy_length) * words_per_position;
  for (int64_t i = first + threadIdx.x; i < end; i += kThreads) {
    dst[i] = i < copied_end ? src[i - first] : word_t{};
  }
}

}  // namespace
}  // namespace dreamr

extern "C" cudaError_t dreamr_kv_rollback_cuda(DreamrCachePointers cache, int64_t num_tensors, int64_t element_size,
                                               dreamr::RollbackShape shape, const int64_t* lengths,
                                               const int64_t* src_row, const int64_t* src_start,
                                               const int64_t* copy_length, int64_t* new_lengths, cudaStream_t stream) {
  if (num_tensors == 0 || shape.batch == 0 || shape.heads == 0) return cudaSuccess;
  if (shape.batch > 65535 || shape.heads > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(num_tensors), static_cast<unsigned>(shape.batch),
                  static_cast<unsigned>(shape.heads));
  const int64_t position_bytes = shape.head_dim * element_size;
  auto launch = [&](auto word) {
    using word_t = decltype(word);
    dreamr::kv_rollback_kernel<word_t><<<grid, dreamr::kThreads, 0, stream>>>(
        cache, shape, position_bytes / static_cast<int64_t>(sizeof(word_t)), lengths, src_row, src_start, copy_length,
        new_lengths);
    return cudaGetLastError();
  };
  if (position_bytes % 16 == 0) return launch(uint4{});
  if (position_bytes % 8 == 0) return launch(uint2{});
  if (position_bytes % 4 == 0) return launch(uint32_t{});
  if (position_bytes % 2 == 0) return launch(uint16_t{});
  return launch(uint8_t{});
}
