#include "checks.h"

#include <atomic>
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

// Whether a data-dependent check reads its result on the host: always in
// "sync" mode, and in "auto" mode for every device but CUDA, where reading
// would stall the stream and break CUDA-graph capture.
bool check_syncs(const at::Tensor& tensor) {
  const IndexCheck mode = index_check_mode().load();
  return mode == IndexCheck::Sync || (mode == IndexCheck::Auto && !tensor.is_cuda());
}

constexpr const char* kAsyncCheckHint =
    " (a device-side check, which does not say more; INTERPKERNELS_INDEX_CHECK=sync or "
    "interpkernels.set_index_check('sync') names the offending values)";

}  // namespace

std::string index_check() { return kIndexCheckNames[static_cast<int>(index_check_mode().load())]; }

void set_index_check(const std::string& mode) { index_check_mode().store(parse_index_check(mode)); }

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

void check_component_attribution_args(const at::Tensor& h, const at::Tensor& B, const at::Tensor& G) {
  TORCH_CHECK_VALUE(h.dim() == 3 && B.dim() == 3 && G.dim() == 3 && B.size(0) == h.size(1) && B.size(1) == h.size(2) &&
                        G.size(0) == h.size(0) && G.size(2) == B.size(2),
                    "component_attribution: expected h [N, C, m], B [C, m, d], G [N, O, d], got ", h.sizes(), ", ",
                    B.sizes(), ", ", G.sizes());
  check_same_dtype(h, B, "B");
  check_same_dtype(h, G, "G");
  check_on_device(B, h.device(), "B");
  check_on_device(G, h.device(), "G");
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

}  // namespace interpkernels
