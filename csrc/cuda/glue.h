#pragma once
// Helpers of the torch glue around the torch-free CUDA kernels. Compiled only
// where torch is a CUDA build.
#include <ATen/ATen.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace interpkernels::cuda_glue {

// Calls fn with a value of the kernel element type for dtype. __half and
// __nv_bfloat16 have the bit layout of at::Half and at::BFloat16, so tensor
// data is passed by reinterpret_cast.
template <typename Fn>
void dispatch_float_type(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kHalf:
      fn(__half{});
      break;
    case at::kBFloat16:
      fn(__nv_bfloat16{});
      break;
    default:
      TORCH_CHECK_TYPE(false, op, ": expected float32, float16 or bfloat16 tensors on CUDA, got ", dtype);
  }
}

template <typename scalar_t>
const scalar_t* data_as(const at::Tensor& tensor) {
  return reinterpret_cast<const scalar_t*>(tensor.const_data_ptr());
}

template <typename scalar_t>
scalar_t* mutable_data_as(at::Tensor& tensor) {
  return reinterpret_cast<scalar_t*>(tensor.mutable_data_ptr());
}

inline void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, "interpkernels: CUDA kernel ", kernel, " failed: ", cudaGetErrorString(status));
}

}  // namespace interpkernels::cuda_glue
