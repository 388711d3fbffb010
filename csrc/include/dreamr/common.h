// Shared definitions for dreamr's kernels: host/device qualifiers, limits and the acceptance rule.
// Plain C++ (compiles with g++ and nvcc); no torch headers.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define DREAMR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DREAMR_HOST_DEVICE inline
#endif

namespace dreamr {

// Verdict token sets and the layer list travel to CUDA kernels by value, inside the kernel's
// parameter block, so a launch needs no host-to-device copy (and stays capturable in a CUDA graph).
constexpr int kMaxVerdictIds = 64;     // per set (positive, negative)
constexpr int kMaxCacheTensors = 256;  // keys + values of up to 128 layers

// Widen a stored probability or logit to float. torch builds CUDA code with the implicit __half and
// __nv_bfloat16 conversions disabled, so those go through the explicit intrinsics.
template <typename T>
DREAMR_HOST_DEVICE float to_float(T x) {
  return static_cast<float>(x);
}
#if defined(__CUDACC__)
DREAMR_HOST_DEVICE float to_float(__half x) { return __half2float(x); }
DREAMR_HOST_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
#endif

// accept iff cpn > alpha, compared in float32 (alpha arrives as a double from Python and is narrowed by
// the caller), with both ends exact and explicit: alpha >= 1 rejects every step (whatever the cpn, also
// one that rounded to 1), alpha <= 0 accepts every finite verdict (even a cpn that underflowed to 0), and
// a NaN cpn (broken verdict) never accepts. dreamr.reference.accepts / accepts_value mirror this in Python.
DREAMR_HOST_DEVICE bool accepts(float cpn, float alpha) {
  if (cpn != cpn) return false;  // NaN; written this way so --use_fast_math cannot fold it away
  if (alpha >= 1.f) return false;
  return alpha <= 0.f || cpn > alpha;
}

}  // namespace dreamr
