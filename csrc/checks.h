#pragma once
// Checks shared by every device's kernels. The Python wrappers validate and
// flatten first; these keep a direct torch.ops call from reading out of
// bounds, and hold the one data-dependent check (index range), which must
// live inside the op for torch.compile to trace around it.
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

namespace interpkernels {

// How the data-dependent checks (index range, latent_mask's count) run:
//   "sync"   read the result on the host and raise a precise error before any
//            kernel runs (one host sync per check);
//   "async"  a device-side assertion (torch._assert_async): no host sync, so
//            CUDA graphs capture it, but the error surfaces at the next sync
//            and says less;
//   "auto"   (default) "async" on CUDA tensors, "sync" elsewhere.
// Initially INTERPKERNELS_INDEX_CHECK; std::invalid_argument for other names.
std::string index_check();
void set_index_check(const std::string& mode);
// Whether a data-dependent check on a tensor (on CUDA or not) reads its result
// on the host; the rule of the C++ checks and of the Python ones
// (interpkernels._validation), which end their device-side messages with
// kAsyncCheckHint.
bool index_check_syncs(bool on_cuda);
extern const char* const kAsyncCheckHint;

// values [N, k] and int64 indices of the same shape.
void check_sparse_code(const at::Tensor& values, const at::Tensor& indices);

void check_same_dtype(const at::Tensor& reference, const at::Tensor& other, const char* argument);

void check_on_device(const at::Tensor& tensor, const at::Device& device, const char* argument);

// IndexError naming `argument` unless every index lies in [0, num_latents):
// one min/max reduction, then a host read or a device-side assertion (index_check).
void check_indices_in_range(const at::Tensor& indices, int64_t num_latents, const char* argument);

// Every check of each sparse product's arguments (shapes, dtypes, devices,
// index range), for the kernels of every device.
void check_sparse_decode_args(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                              const std::optional<at::Tensor>& bias);
void check_gathered_dot_args(const at::Tensor& dense, const at::Tensor& indices, const at::Tensor& W);
// topk_encode's arguments, and that latent_mask (if any) keeps at least k
// latents: one count, checked as index_check says.
void check_topk_encode_args(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, int64_t k,
                            const std::optional<at::Tensor>& pre_bias, const std::optional<at::Tensor>& latent_mask,
                            const std::optional<at::Tensor>& threshold);
void check_sparse_transpose_matmul_args(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& dense,
                                        int64_t num_latents);
// latent_grouping's: int64 indices [N, k] in [0, num_latents).
void check_latent_grouping_args(const at::Tensor& indices, int64_t num_latents);
// grouped_transpose_matmul's, as sparse_transpose_matmul's with a grouping
// (int64, 1-D, at least N*k + 1 long, on dense's device); returns num_latents.
int64_t check_grouped_transpose_matmul_args(const at::Tensor& values, const at::Tensor& indices,
                                            const at::Tensor& dense, const at::Tensor& grouping);

// component_attribution's layers, each h [N, C, m_l], B [C, m_l, d_l], G [N, O, d_l]
// (N, C, O shared): at least one, one dtype, one device.
void check_component_attribution_args(at::TensorList h, at::TensorList B, at::TensorList G);

// masked_component_forward's x [N, d_in], h and mask [N, C], U [C, d_out], W_delta
// [d_out, d_in], delta_mask [N], bias [d_out]: one dtype, one device.
void check_masked_component_forward_args(const at::Tensor& x, const at::Tensor& h, const at::Tensor& mask,
                                         const at::Tensor& U, const std::optional<at::Tensor>& W_delta,
                                         const std::optional<at::Tensor>& delta_mask,
                                         const std::optional<at::Tensor>& bias);

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
