#include "checks.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace interpkernels {

namespace {

enum class IndexCheck { Auto, Sync, Async };
constexpr const char* kIndexCheckNames[] = {"auto", "sync", "async"};

IndexCheck parse_index_check(const std::string& name) {
  for (int mode = 0; mode < 3; ++mode) {
    if (name == kIndexCheckNames[mode]) return static_cast<IndexCheck>(mode);
  }
  throw std::invalid_argument("INTERPKERNELS_INDEX_CHECK / set_index_check: expected 'auto', 'sync' or 'async', got '" +
                              name + "'");
}

// Read from INTERPKERNELS_INDEX_CHECK on first use, so that a bad value raises
// from the import (interpkernels/__init__.py asks for the mode once).
std::atomic<IndexCheck>& index_check_mode() {
  static std::atomic<IndexCheck> mode{[] {
    const char* requested = std::getenv("INTERPKERNELS_INDEX_CHECK");
    return requested == nullptr ? IndexCheck::Auto : parse_index_check(requested);
  }()};
  return mode;
}

bool check_syncs(const at::Tensor& tensor) { return index_check_syncs(tensor.is_cuda()); }

}  // namespace

const char* const kAsyncCheckHint =
    " (a device-side check, which does not say more; INTERPKERNELS_INDEX_CHECK=sync or "
    "interpkernels.set_index_check('sync') names the offending values)";

std::string index_check() { return kIndexCheckNames[static_cast<int>(index_check_mode().load())]; }

void set_index_check(const std::string& mode) { index_check_mode().store(parse_index_check(mode)); }

// Always in "sync" mode, and in "auto" mode for every device but CUDA, where
// reading would stall the stream and break CUDA-graph capture.
bool index_check_syncs(bool on_cuda) {
  const IndexCheck mode = index_check_mode().load();
  return mode == IndexCheck::Sync || (mode == IndexCheck::Auto && !on_cuda);
}

void check_sparse_code(const at::Tensor& values, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(values.dim() == 2 && indices.sizes() == values.sizes(),
                    "values and indices: expected two tensors of one shape [N, k], got ", values.sizes(), " and ",
                    indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices: expected int64, got ", indices.scalar_type());
}

void check_same_dtype(const at::Tensor& reference, const at::Tensor& other, const char* argument) {
  TORCH_CHECK_TYPE(other.scalar_type() == reference.scalar_type(), argument, ": expected dtype ",
                   reference.scalar_type(), ", got ", other.scalar_type());
}

void check_indices_in_range(const at::Tensor& indices, int64_t num_latents, const char* argument) {
  if (indices.numel() == 0) return;
  const auto [lowest, highest] = at::aminmax(indices);
  if (!check_syncs(indices)) {
    at::_assert_async(at::logical_and(lowest >= 0, highest < num_latents),
                      std::string(argument) + ": expected every index in [0, " + std::to_string(num_latents) + ")" +
                          kAsyncCheckHint);
    return;
  }
  const at::Tensor bounds = at::stack({lowest, highest}).cpu();  // both bounds in one copy
  const int64_t* bound = bounds.const_data_ptr<int64_t>();
  TORCH_CHECK_INDEX(bound[0] >= 0 && bound[1] < num_latents, argument, ": expected every index in [0, ",
                    num_latents, "), got values from ", bound[0], " to ", bound[1]);
}

void check_on_device(const at::Tensor& tensor, const at::Device& device, const char* argument) {
  TORCH_CHECK_VALUE(tensor.device() == device, argument, ": expected a tensor on ", device, ", got one on ",
                    tensor.device());
}

void check_topk_encode_args(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, int64_t k,
                            const std::optional<at::Tensor>& pre_bias, const std::optional<at::Tensor>& latent_mask,
                            const std::optional<at::Tensor>& threshold) {
  TORCH_CHECK_VALUE(x.dim() == 2 && W_enc.dim() == 2 && x.size(1) == W_enc.size(1),
                    "topk_encode: expected x [N, d] and W_enc [M, d], got ", x.sizes(), " and ", W_enc.sizes());
  const int64_t d = x.size(1), M = W_enc.size(0);
  TORCH_CHECK_VALUE(b_enc.dim() == 1 && b_enc.size(0) == M, "b_enc: expected shape [", M, "], got ", b_enc.sizes());
  check_same_dtype(x, W_enc, "W_enc");
  check_same_dtype(x, b_enc, "b_enc");
  check_on_device(W_enc, x.device(), "W_enc");
  check_on_device(b_enc, x.device(), "b_enc");
  if (pre_bias.has_value()) {
    TORCH_CHECK_VALUE(pre_bias->dim() == 1 && pre_bias->size(0) == d, "pre_bias: expected shape [", d, "], got ",
                      pre_bias->sizes());
    check_same_dtype(x, *pre_bias, "pre_bias");
    check_on_device(*pre_bias, x.device(), "pre_bias");
  }
  TORCH_CHECK_VALUE(k >= 1 && k <= M, "k: expected 1 <= k <= M = ", M, ", got ", k);
  if (latent_mask.has_value()) {
    TORCH_CHECK_TYPE(latent_mask->scalar_type() == at::kBool && latent_mask->dim() == 1 && latent_mask->size(0) == M,
                     "latent_mask: expected a bool tensor of shape [", M, "], got ", latent_mask->scalar_type(), " ",
                     latent_mask->sizes());
    check_on_device(*latent_mask, x.device(), "latent_mask");
    if (!check_syncs(*latent_mask)) {
      at::_assert_async(latent_mask->sum() >= k, "k: expected at most as many latents as latent_mask keeps in, got " +
                                                     std::to_string(k) + kAsyncCheckHint);
    } else {
      const int64_t kept = latent_mask->sum().item<int64_t>();
      TORCH_CHECK_VALUE(k <= kept, "k: expected at most the ", kept, " latents latent_mask keeps in, got ", k);
    }
  }
  if (threshold.has_value()) {
    TORCH_CHECK_VALUE(threshold->dim() == 1 && threshold->size(0) == M, "threshold: expected shape [", M, "], got ",
                      threshold->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(threshold->scalar_type()), "threshold: expected a float tensor, got ",
                     threshold->scalar_type());
    check_on_device(*threshold, x.device(), "threshold");
  }
}

void check_sparse_decode_args(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                              const std::optional<at::Tensor>& bias) {
  check_sparse_code(values, indices);
  TORCH_CHECK_VALUE(W_dec.dim() == 2, "W_dec: expected shape [M, d], got ", W_dec.sizes());
  check_same_dtype(W_dec, values, "values");
  check_on_device(values, W_dec.device(), "values");
  check_on_device(indices, W_dec.device(), "indices");
  if (bias.has_value()) {
    check_same_dtype(W_dec, *bias, "bias");
    check_on_device(*bias, W_dec.device(), "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == W_dec.size(1), "bias: expected shape [", W_dec.size(1),
                      "], got ", bias->sizes());
  }
  check_indices_in_range(indices, W_dec.size(0), "indices");
}

void check_gathered_dot_args(const at::Tensor& dense, const at::Tensor& indices, const at::Tensor& W) {
  TORCH_CHECK_VALUE(dense.dim() == 2 && W.dim() == 2 && dense.size(1) == W.size(1) && indices.dim() == 2 &&
                        indices.size(0) == dense.size(0),
                    "gathered_dot: expected dense [N, d], indices [N, k], W [M, d], got ", dense.sizes(), ", ",
                    indices.sizes(), ", ", W.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices: expected int64, got ", indices.scalar_type());
  check_same_dtype(dense, W, "W");
  check_on_device(indices, dense.device(), "indices");
  check_on_device(W, dense.device(), "W");
  check_indices_in_range(indices, W.size(0), "indices");
}

void check_sparse_transpose_matmul_args(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& dense,
                                        int64_t num_latents) {
  check_sparse_code(values, indices);
  check_same_dtype(dense, values, "values");
  TORCH_CHECK_VALUE(dense.dim() == 2 && dense.size(0) == values.size(0), "dense: expected shape [N, d] with N = ",
                    values.size(0), ", got ", dense.sizes());
  TORCH_CHECK_VALUE(num_latents >= 0, "num_latents: expected a non-negative count, got ", num_latents);
  check_on_device(values, dense.device(), "values");
  check_on_device(indices, dense.device(), "indices");
  check_indices_in_range(indices, num_latents, "indices");
}

void check_latent_grouping_args(const at::Tensor& indices, int64_t num_latents) {
  TORCH_CHECK_VALUE(indices.dim() == 2, "indices: expected shape [N, k], got ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices: expected int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(num_latents >= 0, "num_latents: expected a non-negative count, got ", num_latents);
  check_indices_in_range(indices, num_latents, "indices");
}

int64_t check_grouped_transpose_matmul_args(const at::Tensor& values, const at::Tensor& indices,
                                            const at::Tensor& dense, const at::Tensor& grouping) {
  TORCH_CHECK_TYPE(grouping.scalar_type() == at::kLong && grouping.dim() == 1 &&
                       grouping.numel() >= values.numel() + 1,
                   "grouping: expected the int64 [num_latents + 1 + N*k] of latent_grouping(indices), got ",
                   grouping.scalar_type(), " ", grouping.sizes());
  check_on_device(grouping, dense.device(), "grouping");
  const int64_t num_latents = grouping.numel() - 1 - values.numel();
  check_sparse_transpose_matmul_args(values, indices, dense, num_latents);
  return num_latents;
}

void check_component_attribution_args(at::TensorList h, at::TensorList B, at::TensorList G) {
  TORCH_CHECK_VALUE(!h.empty() && B.size() == h.size() && G.size() == h.size(),
                    "component_attribution: expected one h, B and G per layer (at least one layer), got ", h.size(),
                    ", ", B.size(), " and ", G.size(), " tensors");
  for (size_t l = 0; l < h.size(); ++l) {
    // Every layer shares the tokens N, the components C and the outputs O; m and d are its own.
    TORCH_CHECK_VALUE(h[l].dim() == 3 && B[l].dim() == 3 && G[l].dim() == 3 && h[l].size(0) == h[0].size(0) &&
                          h[l].size(1) == h[0].size(1) && G[l].size(1) == G[0].size(1) &&
                          B[l].size(0) == h[l].size(1) && B[l].size(1) == h[l].size(2) &&
                          G[l].size(0) == h[l].size(0) && G[l].size(2) == B[l].size(2),
                      "component_attribution: expected h [N, C, m], B [C, m, d], G [N, O, d] per layer (N, C, O "
                      "shared), got for layer ", l, ": ", h[l].sizes(), ", ", B[l].sizes(), ", ", G[l].sizes(),
                      " (layer 0: ", h[0].sizes(), ", ", G[0].sizes(), ")");
    check_same_dtype(h[0], h[l], "h");
    check_same_dtype(h[0], B[l], "B");
    check_same_dtype(h[0], G[l], "G");
    check_on_device(h[l], h[0].device(), "h");
    check_on_device(B[l], h[0].device(), "B");
    check_on_device(G[l], h[0].device(), "G");
  }
}

void check_masked_component_forward_args(const at::Tensor& x, const at::Tensor& h, const at::Tensor& mask,
                                         const at::Tensor& U, const std::optional<at::Tensor>& W_delta,
                                         const std::optional<at::Tensor>& delta_mask,
                                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2 && h.dim() == 2 && U.dim() == 2 && h.size(0) == x.size(0) && U.size(0) == h.size(1) &&
                        mask.sizes() == h.sizes(),
                    "masked_component_forward: expected x [N, d_in], h and mask [N, C], U [C, d_out], got ", x.sizes(),
                    ", ", h.sizes(), ", ", mask.sizes(), ", ", U.sizes());
  const int64_t N = x.size(0), d_in = x.size(1), d_out = U.size(1);
  for (const auto& [tensor, name] : {std::pair{&h, "h"}, {&mask, "mask"}, {&U, "U"}}) {
    check_same_dtype(x, *tensor, name);
    check_on_device(*tensor, x.device(), name);
  }
  TORCH_CHECK_VALUE(W_delta.has_value() || !delta_mask.has_value(), "delta_mask: given without W_delta");
  if (W_delta.has_value()) {
    TORCH_CHECK_VALUE(W_delta->dim() == 2 && W_delta->size(0) == d_out && W_delta->size(1) == d_in,
                      "W_delta: expected shape [d_out, d_in] = [", d_out, ", ", d_in, "], got ", W_delta->sizes());
    check_same_dtype(x, *W_delta, "W_delta");
    check_on_device(*W_delta, x.device(), "W_delta");
  }
  if (delta_mask.has_value()) {
    TORCH_CHECK_VALUE(delta_mask->dim() == 1 && delta_mask->size(0) == N, "delta_mask: expected shape [", N,
                      "], got ", delta_mask->sizes());
    check_same_dtype(x, *delta_mask, "delta_mask");
    check_on_device(*delta_mask, x.device(), "delta_mask");
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d_out, "bias: expected shape [", d_out, "], got ",
                      bias->sizes());
    check_same_dtype(x, *bias, "bias");
    check_on_device(*bias, x.device(), "bias");
  }
}

// ---- Attribution patching ----

namespace {

void check_code_of_rows(const at::Tensor& values, const at::Tensor& indices, int64_t rows, const at::Tensor& like,
                        const char* values_name, const char* indices_name) {
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == rows, values_name, ": expected shape [N, k] with N = ",
                    rows, ", got ", values.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), indices_name, ": expected shape ", values.sizes(), " (that of ",
                    values_name, "), got ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, indices_name, ": expected int64, got ", indices.scalar_type());
  check_same_dtype(like, values, values_name);
  check_on_device(values, like.device(), values_name);
  check_on_device(indices, like.device(), indices_name);
}

}  // namespace

void check_latent_attribution_args(const at::Tensor& clean_values, const at::Tensor& clean_indices,
                                   const at::Tensor& patched_values, const at::Tensor& patched_indices,
                                   const at::Tensor& grad, const at::Tensor& W_dec) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && W_dec.dim() == 2 && grad.size(1) == W_dec.size(1),
                    "latent_attribution: expected grad [N, d] and W_dec [M, d], got ", grad.sizes(), " and ",
                    W_dec.sizes());
  check_same_dtype(grad, W_dec, "W_dec");
  check_on_device(W_dec, grad.device(), "W_dec");
  check_code_of_rows(clean_values, clean_indices, grad.size(0), grad, "clean_values", "clean_indices");
  check_code_of_rows(patched_values, patched_indices, grad.size(0), grad, "patched_values", "patched_indices");
  check_indices_in_range(clean_indices, W_dec.size(0), "clean_indices");
  check_indices_in_range(patched_indices, W_dec.size(0), "patched_indices");
}

void check_error_attribution_args(const at::Tensor& clean_error, const at::Tensor& patched_error,
                                  const at::Tensor& grad) {
  TORCH_CHECK_VALUE(grad.dim() == 2, "grad: expected shape [N, d], got ", grad.sizes());
  TORCH_CHECK_VALUE(clean_error.sizes() == grad.sizes(), "clean_error: expected shape ", grad.sizes(),
                    " (that of grad), got ", clean_error.sizes());
  TORCH_CHECK_VALUE(patched_error.sizes() == grad.sizes(), "patched_error: expected shape ", grad.sizes(),
                    " (that of grad), got ", patched_error.sizes());
  check_same_dtype(grad, clean_error, "clean_error");
  check_same_dtype(grad, patched_error, "patched_error");
  check_on_device(clean_error, grad.device(), "clean_error");
  check_on_device(patched_error, grad.device(), "patched_error");
}

void check_feature_edges_args(const at::Tensor& src_values, const at::Tensor& src_indices, const at::Tensor& W_dec_src,
                              const at::Tensor& dst_indices, const at::Tensor& W_enc_dst, const at::Tensor& dst_scale,
                              std::optional<int64_t> top_k, std::optional<double> threshold) {
  TORCH_CHECK_VALUE(W_dec_src.dim() == 2 && W_enc_dst.dim() == 2 && W_dec_src.size(1) == W_enc_dst.size(1),
                    "feature_edges: expected W_dec_src [M_src, d] and W_enc_dst [M_dst, d], got ", W_dec_src.sizes(),
                    " and ", W_enc_dst.sizes());
  check_same_dtype(W_dec_src, W_enc_dst, "W_enc_dst");
  check_on_device(W_enc_dst, W_dec_src.device(), "W_enc_dst");
  TORCH_CHECK_VALUE(src_values.dim() == 2, "src_values: expected shape [N, k_src], got ", src_values.sizes());
  check_code_of_rows(src_values, src_indices, src_values.size(0), W_dec_src, "src_values", "src_indices");
  check_code_of_rows(dst_scale, dst_indices, src_values.size(0), W_dec_src, "dst_scale", "dst_indices");
  TORCH_CHECK_VALUE(!top_k.has_value() || *top_k >= 1, "top_k: expected at least 1, got ", top_k.value_or(0));
  TORCH_CHECK_VALUE(!threshold.has_value() || !std::isnan(*threshold), "threshold: expected a number, got NaN");
  check_indices_in_range(src_indices, W_dec_src.size(0), "src_indices");
  check_indices_in_range(dst_indices, W_enc_dst.size(0), "dst_indices");
}

}  // namespace interpkernels
