// CUDA registration of the TopK encoder of docs/OPS.md, the two-pass path for
// large k, as torch glue around the torch-free kernel of topk_encode_kernels.cu.
// Rows go in chunks; per chunk:
//   pass 1 (ATen, cuBLAS)  pre [rows, M] = (x - pre_bias) @ W_enc^T + b_enc in
//                          float32 (16-bit inputs go straight into a tensor-core
//                          GEMM with float32 output: no float32 copies of them)
//   pass 2 (the kernel)    per row, the k highest-ranked latents (NaN first,
//                          then pre > threshold, then larger pre, then lower
//                          index), in rank order, values = relu(pre).
// Unlike the fused Triton encoder this path writes pre-activations, but only a
// chunk's: at most kPreActivationBytes (plus the chunk's centred x), whatever
// N. It is meant for large k (AuxK's k_aux = d_in / 2), where a running per-row
// top-k no longer fits in registers. Compiled only when torch is a CUDA build.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h, which needs cuBLAS headers
#include <torch/library.h>

#include <algorithm>
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

// The most float32 pre-activation memory one call holds: 256 MiB, 512 rows at
// M = 131072 -- a GEMM still large enough to run at the tensor cores' rate.
constexpr int64_t kPreActivationBytes = int64_t{256} << 20;

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
  // win. The centering is done in x's dtype, as on the CPU.
  const bool sixteen_bit = x.scalar_type() != at::kFloat;
  const at::Tensor bias = b_enc.to(at::kFloat);
  const at::Tensor W_t = W_enc.t();
  const int64_t chunk_rows = std::clamp<int64_t>(kPreActivationBytes / (4 * std::max<int64_t>(M, 1)), 1, N);
  at::Tensor pre_buffer = at::empty({chunk_rows, M}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (int64_t start = 0; start < N; start += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, N - start);
    const at::Tensor x_rows = x.narrow(0, start, rows);
    const at::Tensor centered = pre_bias.has_value() ? x_rows - *pre_bias : x_rows;
    at::Tensor pre = pre_buffer.narrow(0, 0, rows);
    if (sixteen_bit) {
      at::mm_out(pre, centered, W_t, at::kFloat);
      pre.add_(bias);
    } else {
      at::addmm_out(pre, bias, centered, W_t);
    }
    dispatch_float_type(x.scalar_type(), "topk_encode", [&](auto element) {
      using scalar_t = decltype(element);
      check_launch(kernels::launch_topk_select<scalar_t>(
                       pre.const_data_ptr<float>(), mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
                       theta.defined() ? theta.const_data_ptr<float>() : nullptr, rows, M, k,
                       mutable_data_as<scalar_t>(values) + start * k, indices.mutable_data_ptr<int64_t>() + start * k,
                       stream),
                   "topk_select");
    });
  }
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(interpkernels, CUDA, m) { m.impl("topk_encode", &topk_encode_cuda); }

}  // namespace interpkernels::cuda_glue
