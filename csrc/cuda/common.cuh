// Small CUDA helpers shared by the kernels: dtype dispatch and warp/block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace dreamr {

// Widen a stored element to the accumulation type (half types go through float).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T x) {
  return static_cast<acc_t>(x);
}
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half x) {
  return static_cast<acc_t>(__half2float(x));
}
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 x) {
  return static_cast<acc_t>(__bfloat162float(x));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Calls f(T{}) with the element type that dtype names.
template <typename F>
cudaError_t dispatch_float(DreamrDType dtype, F&& f) {
  switch (dtype) {
    case kDreamrFloat32: return f(float{});
    case kDreamrFloat64: return f(double{});
    case kDreamrFloat16: return f(__half{});
    case kDreamrBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>(n > 0 ? n : 1); }

}  // namespace dreamr
