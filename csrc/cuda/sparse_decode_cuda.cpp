// CUDA registrations of the sparse-code products of docs/OPS.md, as torch glue
// around the torch-free kernels of sparse_decode_kernels.cu:
//   sparse_decode            out[n]    = sum_j values[n,j] * W[indices[n,j]] + bias
//   gathered_dot             out[n,j]  = W[indices[n,j]] . dense[n]
//   sparse_transpose_matmul  rows[i]   = sum_{(n,j): indices[n,j]=i} values[n,j] * dense[n]
// Compiled only when torch is a CUDA build. The Python wrappers validate and
// flatten first; the checks here are the cheap ones that keep a direct
// torch.ops call from making a kernel read out of bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h, which needs cuBLAS headers
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "outputs.h"
#include "cuda/glue.h"
#include "cuda/sparse_decode_kernels.cuh"

namespace interpkernels::cuda_glue {
namespace {

namespace kernels = interpkernels::cuda;

at::Tensor sparse_decode_cuda(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                              const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard device_guard(W_dec.device());
  check_sparse_decode_args(values, indices, W_dec, bias);
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1);

  at::Tensor out = new_output({N, d}, W_dec.options());
  if (out.numel() == 0) return out;
  const at::Tensor values_c = values.contiguous(), indices_c = indices.contiguous(), weight = W_dec.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_type(W_dec.scalar_type(), "sparse_decode", [&](auto element) {
    using scalar_t = decltype(element);
    check_launch(kernels::launch_sparse_decode_forward<scalar_t>(
                     data_as<scalar_t>(values_c), indices_c.const_data_ptr<int64_t>(), data_as<scalar_t>(weight),
                     bias_c.defined() ? data_as<scalar_t>(bias_c) : nullptr, mutable_data_as<scalar_t>(out), N, k,
                     d, stream),
                 "sparse_decode_forward");
  });
  return out;
}

at::Tensor gathered_dot_cuda(const at::Tensor& dense, const at::Tensor& indices, const at::Tensor& W) {
  const c10::cuda::CUDAGuard device_guard(dense.device());
  check_gathered_dot_args(dense, indices, W);
  const int64_t N = indices.size(0), k = indices.size(1), d = W.size(1);

  at::Tensor out = new_output({N, k}, dense.options());
  if (out.numel() == 0) return out;
  const at::Tensor dense_c = dense.contiguous(), indices_c = indices.contiguous(), weight = W.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_type(dense.scalar_type(), "gathered_dot", [&](auto element) {
    using scalar_t = decltype(element);
    check_launch(kernels::launch_gathered_dot<scalar_t>(data_as<scalar_t>(dense_c), indices_c.const_data_ptr<int64_t>(),
                                                        data_as<scalar_t>(weight), mutable_data_as<scalar_t>(out), N,
                                                        k, d, stream),
                 "gathered_dot");
  });
  return out;
}

// The grouping layout of the latent_grouping op (csrc/ops.cpp): offsets
// [num_latents + 1], then the entry order [N*k], built by a stable radix sort.
at::Tensor group_by_latent(const at::Tensor& indices, int64_t num_latents) {
  const int64_t num_entries = indices.numel();
  at::Tensor grouping = at::zeros({num_latents + 1 + num_entries}, indices.options());
  if (num_entries == 0) return grouping;
  const at::Tensor indices_c = indices.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t* offsets = grouping.mutable_data_ptr<int64_t>();
  size_t workspace_bytes = 0;
  check_launch(kernels::launch_group_by_latent(indices_c.const_data_ptr<int64_t>(), num_entries, num_latents, nullptr,
                                               nullptr, nullptr, &workspace_bytes, stream),
               "group_by_latent (workspace query)");
  // The workspace may be freed before the sort has run: the caching allocator
  // reuses its memory only for later work on this stream, ordered after it.
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, indices.options().dtype(at::kByte));
  check_launch(kernels::launch_group_by_latent(indices_c.const_data_ptr<int64_t>(), num_entries, num_latents, offsets,
                                               offsets + num_latents + 1, workspace.mutable_data_ptr(),
                                               &workspace_bytes, stream),
               "group_by_latent");
  return grouping;
}

std::tuple<at::Tensor, at::Tensor> grouped_rows(const at::Tensor& values, const at::Tensor& dense,
                                                const at::Tensor& grouping, int64_t num_latents) {
  const int64_t k = values.size(1), d = dense.size(1);
  if (values.numel() == 0) {
    return {at::zeros({num_latents, d}, dense.options()), at::zeros({num_latents}, values.options())};
  }
  const at::Tensor values_c = values.contiguous(), dense_c = dense.contiguous();
  const int64_t* offsets = grouping.const_data_ptr<int64_t>();
  at::Tensor rows = new_output({num_latents, d}, dense.options());
  at::Tensor value_sums = new_output({num_latents}, values.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_type(dense.scalar_type(), "sparse_transpose_matmul", [&](auto element) {
    using scalar_t = decltype(element);
    check_launch(kernels::launch_sparse_transpose_matmul<scalar_t>(
                     data_as<scalar_t>(values_c), data_as<scalar_t>(dense_c), offsets, offsets + num_latents + 1, k,
                     d, num_latents, mutable_data_as<scalar_t>(rows), mutable_data_as<scalar_t>(value_sums), stream),
                 "sparse_transpose_matmul");
  });
  return {rows, value_sums};
}

std::tuple<at::Tensor, at::Tensor> sparse_transpose_matmul_cuda(const at::Tensor& values, const at::Tensor& indices,
                                                               const at::Tensor& dense, int64_t num_latents) {
  const c10::cuda::CUDAGuard device_guard(dense.device());
  check_sparse_transpose_matmul_args(values, indices, dense, num_latents);
  return grouped_rows(values, dense, group_by_latent(indices, num_latents), num_latents);
}

at::Tensor latent_grouping_cuda(const at::Tensor& indices, int64_t num_latents) {
  const c10::cuda::CUDAGuard device_guard(indices.device());
  check_latent_grouping_args(indices, num_latents);
  return group_by_latent(indices, num_latents);
}

std::tuple<at::Tensor, at::Tensor> grouped_transpose_matmul_cuda(const at::Tensor& values, const at::Tensor& indices,
                                                                 const at::Tensor& dense, const at::Tensor& grouping) {
  const c10::cuda::CUDAGuard device_guard(dense.device());
  const int64_t num_latents = check_grouped_transpose_matmul_args(values, indices, dense, grouping);
  return grouped_rows(values, dense, grouping.contiguous(), num_latents);
}

}  // namespace

TORCH_LIBRARY_IMPL(interpkernels, CUDA, m) {
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("gathered_dot", &gathered_dot_cuda);
  m.impl("sparse_transpose_matmul", &sparse_transpose_matmul_cuda);
  m.impl("latent_grouping", &latent_grouping_cuda);
  m.impl("grouped_transpose_matmul", &grouped_transpose_matmul_cuda);
}

}  // namespace interpkernels::cuda_glue
