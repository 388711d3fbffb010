// CUDA step-level KV-cache rollback: every layer's keys and values in one launch. Block (t, b, h)
// rewrites the tail of head h of row b in tensor t: the copied span from the source row, then zeros up
// to the longest new length in the batch (each block recomputes it from the B lengths: cheaper than a
// second launch, and needs no host read).
// Data moves in the widest word that divides one position's bytes and every stride (16 bytes for bf16
// caches with D a multiple of 8).
#include <cstdint>

#include "common.cuh"

namespace dreamr {
namespace {

constexpr int kThreads = 256;

// Strides and sizes in words of word_t (the launcher picks a word that divides all of them).
struct WordLayout {
  int64_t per_position, stride_batch, stride_head, stride_time;
};

template <typename word_t>
__global__ void __launch_bounds__(kThreads)
    kv_rollback_kernel(DreamrCachePointers cache, RollbackShape shape, WordLayout words,
                       const int64_t* __restrict__ lengths, const int64_t* __restrict__ src_row,
                       const int64_t* __restrict__ src_start, const int64_t* __restrict__ copy_length,
                       int64_t* __restrict__ new_lengths) {
  const int64_t tensor = blockIdx.x, b = blockIdx.y, h = blockIdx.z;
  const RowPlan plan = plan_row(b, shape, lengths, src_row, src_start, copy_length);
  if (tensor == 0 && h == 0 && threadIdx.x == 0) new_lengths[b] = plan.keep + plan.copied;

  word_t* base = static_cast<word_t*>(cache.data[tensor]);
  word_t* dst = base + b * words.stride_batch + h * words.stride_head;
  const word_t* src = base + plan.src_row * words.stride_batch + h * words.stride_head;
  const int64_t copied_end = plan.keep + plan.copied;
  const int64_t zero_end = longest_new_length(shape, lengths, src_row, src_start, copy_length);
  const int64_t count = (zero_end > plan.keep ? zero_end - plan.keep : 0) * words.per_position;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    const int64_t t = plan.keep + i / words.per_position, w = i % words.per_position;
    dst[t * words.stride_time + w] =
        t < copied_end ? src[(plan.src_start + t - plan.keep) * words.stride_time + w] : word_t{};
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
  // The widest word that divides every byte stride and the position size, and that the pointers align to.
  uint64_t common = static_cast<uint64_t>(shape.head_dim * element_size) |
                    static_cast<uint64_t>(shape.stride_time * element_size) |
                    static_cast<uint64_t>(shape.stride_head * element_size) |
                    static_cast<uint64_t>(shape.stride_batch * element_size);
  for (int64_t i = 0; i < num_tensors; ++i) common |= reinterpret_cast<uintptr_t>(cache.data[i]);
  auto launch = [&](auto word) {
    using word_t = decltype(word);
    const auto in_words = [&](int64_t elements) { return elements * element_size / static_cast<int64_t>(sizeof(word_t)); };
    const dreamr::WordLayout words{in_words(shape.head_dim), in_words(shape.stride_batch), in_words(shape.stride_head),
                                   in_words(shape.stride_time)};
    dreamr::kv_rollback_kernel<word_t><<<grid, dreamr::kThreads, 0, stream>>>(cache, shape, words, lengths, src_row,
                                                                              src_start, copy_length, new_lengths);
    return cudaGetLastError();
  };
  if (common % 16 == 0) return launch(uint4{});
  if (common % 8 == 0) return launch(uint2{});
  if (common % 4 == 0) return launch(uint32_t{});
  if (common % 2 == 0) return launch(uint16_t{});
  return launch(uint8_t{});
}
