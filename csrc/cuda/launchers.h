// extern "C" launchers of the CUDA kernels: raw pointers, shapes and a stream; no torch. The .cu files
// define them and compile with nvcc alone; cuda/ops_cuda.cpp checks the torch inputs and calls them.
#pragma once

#include <cuda_runtime.h>

#include "dreamr/cpn.h"
#include "dreamr/rollback.h"
#include "dreamr/sampling.h"

extern "C" {

// Element type of the float inputs.
enum DreamrDType { kDreamrFloat32 = 0, kDreamrFloat64 = 1, kDreamrFloat16 = 2, kDreamrBFloat16 = 3 };

// cpn[b], accept[b] for b < batch; one block per row, all verdict rows of the LM head in that block.
cudaError_t dreamr_cpn_verify_cuda(const void* hidden, const void* weight, const void* bias, int64_t batch,
                                   int64_t hidden_size, DreamrDType dtype, dreamr::VerdictIds ids, float alpha,
                                   float softcap, float* cpn, bool* accept, cudaStream_t stream);

// num_accepted[r], accept[r, :] for r < requests.
cudaError_t dreamr_cpn_window_accept_cuda(const float* cpn, const bool* valid, int64_t requests, int64_t window,
                                          float alpha, int64_t* num_accepted, bool* accept, cudaStream_t stream);

// All tensors of the cache in one launch; copy pointers may be null (no copies).
struct DreamrCachePointers {
  void* data[dreamr::kMaxCacheTensors];
};
cudaError_t dreamr_kv_rollback_cuda(DreamrCachePointers cache, int64_t num_tensors, int64_t element_size,
                                    dreamr::RollbackShape shape, const int64_t* lengths, const int64_t* src_row,
                                    const int64_t* src_start, const int64_t* copy_length, int64_t* new_lengths,
                                    cudaStream_t stream);
// Compaction of all tensors of the cache in one launch, one block per (tensor, head); plan pointers are
// device pointers.
cudaError_t dreamr_kv_compact_cuda(DreamrCachePointers cache, int64_t num_tensors, int64_t element_size,
                                   dreamr::RollbackShape shape, dreamr::CompactPlan plan, cudaStream_t stream);

// Chain speculative sampling; one block per row. dtype is float32, float16 or bfloat16.
cudaError_t dreamr_speculative_sample_cuda(const void* draft_probs, const int64_t* draft_ids, const void* target_probs,
                                           const float* uniforms, dreamr::SamplingShape shape, DreamrDType dtype,
                                           int64_t* tokens, int64_t* num_accepted, cudaStream_t stream);

// Greedy verification; one block per row.
cudaError_t dreamr_greedy_verify_cuda(const int64_t* draft_ids, const void* target_logits, dreamr::SamplingShape shape,
                                      DreamrDType dtype, int64_t* tokens, int64_t* num_accepted, cudaStream_t stream);

}  // extern "C"
