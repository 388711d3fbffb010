// CUDA step-level KV-cache rollback and compaction: every layer's keys and values in one launch each.
// Rollback: block (t, b, h) rewrites the tail of head h of row b in tensor t: the copied span from the
// source row, then zeros up to the longest new length in the batch (each block recomputes it from the B
// lengths: cheaper than a second launch, and needs no host read).
// Compaction: block (t, h) rewrites head h of every output row of tensor t, rows in order (rollback.h,
// CompactPlan, says why that order is safe in place).
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

// Positions of a compaction chunk per thread: the words a thread holds between a chunk's reads and its
// writes (four 16-byte words keep enough loads in flight per thread for a memory-bound copy).
constexpr int kCompactWordsPerThread = 4;

// One block per (tensor, head), rows in order, each row a chunk of positions at a time: every thread
// reads its words of the chunk, the block synchronises, then every thread writes them. Inside a block
// this makes the in-place pass the ordered pass of rollback.h (a chunk's reads see the cache as the
// earlier chunks and rows left it, never a write of the same chunk), and blocks touch disjoint memory
// (one head of one tensor each; overlapping caches are refused on the host). So the kernel is race-free
// for any plan: an unchecked device-held plan that breaks the order rules gets a deterministic result
// (that of the ordered pass), not a race, and its indices are clamped into range.
template <typename word_t>
__global__ void __launch_bounds__(kThreads)
    kv_compact_kernel(DreamrCachePointers cache, RollbackShape shape, WordLayout words, CompactPlan plan) {
  const int64_t tensor = blockIdx.x, h = blockIdx.y;
  __shared__ int64_t zero_end;
  if (threadIdx.x == 0) zero_end = longest_count(plan);
  __syncthreads();
  word_t* base = static_cast<word_t*>(cache.data[tensor]) + h * words.stride_head;
  const int64_t total = zero_end * words.per_position;
  constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kCompactWordsPerThread;
  for (int64_t i = 0; i < plan.rows; ++i) {
    const int64_t src_row = compact_source_row(plan, shape, i), n = compact_count(plan, i);
    word_t* dst = base + i * words.stride_batch;
    const word_t* src = base + src_row * words.stride_batch;
    for (int64_t chunk = 0; chunk < total; chunk += kChunk) {
      word_t held[kCompactWordsPerThread];
      int64_t at[kCompactWordsPerThread];  // destination word offset, -1: nothing to write
#pragma unroll
      for (int k = 0; k < kCompactWordsPerThread; ++k) {
        const int64_t idx = chunk + k * kThreads + threadIdx.x;
        at[k] = -1;
        if (idx >= total) continue;
        const int64_t t = idx / words.per_position, w = idx % words.per_position;
        if (t < n) {
          const int64_t c = compact_column(plan, shape, i, t);
          if (src_row == i && c == t) continue;  // already in place (an unchanged row prefix)
          held[k] = src[c * words.stride_time + w];
        } else {
          held[k] = word_t{};  // the dead span up to the longest row
        }
        at[k] = t * words.stride_time + w;
      }
      __syncthreads();  // every read of this chunk before any of its writes
#pragma unroll
      for (int k = 0; k < kCompactWordsPerThread; ++k) {
        if (at[k] >= 0) dst[at[k]] = held[k];
      }
      __syncthreads();  // and every write before the next chunk's reads
    }
  }
}

// The widest word that divides every byte stride and the position size, and that every pointer aligns
// to; calls launch(word_t{}) with it.
template <typename F>
cudaError_t with_widest_word(const DreamrCachePointers& cache, int64_t num_tensors, int64_t element_size,
                             const RollbackShape& shape, F&& launch) {
  uint64_t common = static_cast<uint64_t>(shape.head_dim * element_size) |
                    static_cast<uint64_t>(shape.stride_time * element_size) |
                    static_cast<uint64_t>(shape.stride_head * element_size) |
                    static_cast<uint64_t>(shape.stride_batch * element_size);
  for (int64_t i = 0; i < num_tensors; ++i) common |= reinterpret_cast<uintptr_t>(cache.data[i]);
  if (common % 16 == 0) return launch(uint4{});
  if (common % 8 == 0) return launch(uint2{});
  if (common % 4 == 0) return launch(uint32_t{});
  if (common % 2 == 0) return launch(uint16_t{});
  return launch(uint8_t{});
}

// Strides and sizes of shape in words of word_t.
template <typename word_t>
WordLayout layout_in_words(const RollbackShape& shape, int64_t element_size) {
  const auto in_words = [&](int64_t elements) {
    return elements * element_size / static_cast<int64_t>(sizeof(word_t));
  };
  return WordLayout{in_words(shape.head_dim), in_words(shape.stride_batch), in_words(shape.stride_head),
                    in_words(shape.stride_time)};
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
  return dreamr::with_widest_word(cache, num_tensors, element_size, shape, [&](auto word) {
    using word_t = decltype(word);
    dreamr::kv_rollback_kernel<word_t><<<grid, dreamr::kThreads, 0, stream>>>(
        cache, shape, dreamr::layout_in_words<word_t>(shape, element_size), lengths, src_row, src_start, copy_length,
        new_lengths);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t dreamr_kv_compact_cuda(DreamrCachePointers cache, int64_t num_tensors, int64_t element_size,
                                              dreamr::RollbackShape shape, dreamr::CompactPlan plan,
                                              cudaStream_t stream) {
  if (num_tensors == 0 || plan.rows == 0 || shape.heads == 0) return cudaSuccess;
  if (shape.heads > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(num_tensors), static_cast<unsigned>(shape.heads));
  return dreamr::with_widest_word(cache, num_tensors, element_size, shape, [&](auto word) {
    using word_t = decltype(word);
    dreamr::kv_compact_kernel<word_t><<<grid, dreamr::kThreads, 0, stream>>>(
        cache, shape, dreamr::layout_in_words<word_t>(shape, element_size), plan);
    return cudaGetLastError();
  });
}
