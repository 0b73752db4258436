#pragma once
// float <-> kernel element type, spelled as intrinsics: torch builds define
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace interpkernels::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x) {
  if constexpr (std::is_same_v<scalar_t, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

}  // namespace interpkernels::cuda
