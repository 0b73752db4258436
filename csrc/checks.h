#pragma once
// Checks shared by every device's kernels. The Python wrappers validate and
// flatten first; these keep a direct torch.ops call from reading out of
// bounds, and hold the one data-dependent check (index range), which must
// live inside the op for torch.compile to trace around it.
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace interpkernels {

// values [N, k] and int64 indices of the same shape.
void check_sparse_code(const at::Tensor& values, const at::Tensor& indices);

void check_same_dtype(const at::Tensor& reference, const at::Tensor& other, const char* argument);

void check_on_device(const at::Tensor& tensor, const at::Device& device, const char* argument);

// IndexError naming `argument` unless every index lies in [0, num_latents).
// One min/max reduction; on CUDA one host sync per op, not per element.
void check_indices_in_range(const at::Tensor& indices, int64_t num_latents, const char* argument);

// Every check of each sparse product's arguments (shapes, dtypes, devices,
// index range), for the kernels of every device.
void check_sparse_decode_args(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                              const std::optional<at::Tensor>& bias);
void check_gathered_dot_args(const at::Tensor& dense, const at::Tensor& indices, const at::Tensor& W);
// topk_encode's arguments, and that latent_mask (if any) keeps at least k
// latents: one count, a host sync on CUDA.
void check_topk_encode_args(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, int64_t k,
                            const std::optional<at::Tensor>& pre_bias, const std::optional<at::Tensor>& latent_mask,
                            const std::optional<at::Tensor>& threshold);
void check_sparse_transpose_matmul_args(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& dense,
                                        int64_t num_latents);

// ---- Attribution patching: every check of each op's arguments (shapes,
// dtypes, devices, index range), for the kernels of every device.
void check_latent_attribution_args(const at::Tensor& clean_values, const at::Tensor& clean_indices,
                                   const at::Tensor& patched_values, const at::Tensor& patched_indices,
                                   const at::Tensor& grad, const at::Tensor& W_dec);
void check_error_attribution_args(const at::Tensor& clean_error, const at::Tensor& patched_error,
                                  const at::Tensor& grad);
void check_feature_edges_args(const at::Tensor& src_values, const at::Tensor& src_indices, const at::Tensor& W_dec_src,
                              const at::Tensor& dst_indices, const at::Tensor& W_enc_dst, const at::Tensor& dst_scale,
                              std::optional<int64_t> top_k, std::optional<double> threshold);

}  // namespace interpkernels
