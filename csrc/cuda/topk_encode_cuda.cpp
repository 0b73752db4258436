// CUDA registration of the TopK encoder of docs/OPS.md, the two-pass path for
// large k, as torch glue around the torch-free kernel of topk_encode_kernels.cu:
//   pass 1 (ATen, cuBLAS)  pre [N, M] = (x - pre_bias) @ W_enc^T + b_enc in float32
//   pass 2 (the kernel)    per row, the k highest-ranked latents (NaN first,
//                          then pre > threshold, then larger pre, then lower
//                          index), in rank order, values = relu(pre).
// Unlike the fused Triton encoder this path MATERIALIZES pre [N, M] (N*M*4
// bytes: 8.6 GB at N = 16384, M = 131072); it is meant for large k, where a
// running per-row top-k no longer fits in registers. Compiled only when torch
// is a CUDA build.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h, which needs cuBLAS headers
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "checks.h"
#include "outputs.h"
#include "cuda/glue.h"
#include "cuda/topk_encode_kernels.cuh"

namespace interpkernels::cuda_glue {
namespace {

namespace kernels = interpkernels::cuda;

std::tuple<at::Tensor, at::Tensor> topk_encode_cuda(const at::Tensor& x, const at::Tensor& W_enc,
                                                    const at::Tensor& b_enc, int64_t k,
                                                    const std::optional<at::Tensor>& pre_bias,
                                                    const std::optional<at::Tensor>& latent_mask,
                                                    const std::optional<at::Tensor>& threshold) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  check_topk_encode_args(x, W_enc, b_enc, k, pre_bias, latent_mask, threshold);
  const int64_t N = x.size(0), M = W_enc.size(0);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   "x: expected float32, float16 or bfloat16 on CUDA, got ", x.scalar_type());
  TORCH_CHECK_VALUE(M <= std::numeric_limits<int32_t>::max(), "W_enc: expected at most 2^31 - 1 latents, got ", M);
  int64_t max_k = 0;
  check_launch(kernels::topk_select_max_k(&max_k), "topk_select (shared memory query)");
  TORCH_CHECK_VALUE(k <= max_k, "k: expected at most ", max_k,
                    " for the CUDA topk_encode on this device (each row's selection is sorted in shared memory), got ",
                    k);
  const at::Tensor mask = latent_mask.has_value() ? latent_mask->contiguous() : at::Tensor();
  const at::Tensor theta = threshold.has_value() ? threshold->to(at::kFloat).contiguous() : at::Tensor();

  at::Tensor values = new_output({N, k}, x.options());
  at::Tensor indices = new_output({N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {values, indices};

  // pre is float32 whatever the input dtype, so the selection ranks unrounded
  // pre-activations, as the CPU kernel (opmath type) does: rounding them to
  // bf16 first would merge distinct values into ties and change which latents
  // win. The centering is done in x's dtype, as on the CPU. For 16-bit inputs
  // this costs float32 copies of x and W_enc.
  const at::Tensor centered = (pre_bias.has_value() ? x - *pre_bias : x).to(at::kFloat);
  const at::Tensor pre = at::addmm(b_enc.to(at::kFloat), centered, W_enc.to(at::kFloat).t()).contiguous();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_type(x.scalar_type(), "topk_encode", [&](auto element) {
    using scalar_t = decltype(element);
    check_launch(kernels::launch_topk_select<scalar_t>(
                     pre.const_data_ptr<float>(), mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
                     theta.defined() ? theta.const_data_ptr<float>() : nullptr, N, M, k,
                     mutable_data_as<scalar_t>(values), indices.mutable_data_ptr<int64_t>(),
                     stream),
                 "topk_select");
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(interpkernels, CUDA, m) { m.impl("topk_encode", &topk_encode_cuda); }

}  // namespace interpkernels::cuda_glue
