// SPD's masked forward through a decomposed linear layer (SPEC section 5):
//   y = (h * mask) @ U + delta_mask[:, None] * (x @ W_delta^T) + bias
// h [N, C] component activations, mask [N, C] in [0, 1], U [C, d_out],
// x [N, d_in], W_delta [d_out, d_in] = W_target - (V U)^T, delta_mask [N].
// One op, device-generic: two GEMMs through ATen (the BLAS / cuBLAS), the mask
// applied in one pass beforehand and the delta term added into the output in
// place, so autograd saves the inputs only (the backward is
// interpkernels.ops.masked_component_forward's).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace interpkernels {
namespace {

at::Tensor masked_component_forward(const at::Tensor& x, const at::Tensor& h, const at::Tensor& mask,
                                    const at::Tensor& U, const std::optional<at::Tensor>& W_delta,
                                    const std::optional<at::Tensor>& delta_mask,
                                    const std::optional<at::Tensor>& bias) {
  check_masked_component_forward_args(x, h, mask, U, W_delta, delta_mask, bias);
  const at::Tensor masked = h * mask;
  at::Tensor out = bias.has_value() ? at::addmm(*bias, masked, U) : at::mm(masked, U);
  if (W_delta.has_value()) {
    const at::Tensor delta = at::mm(x, W_delta->t());
    if (delta_mask.has_value()) {
      out.addcmul_(delta, delta_mask->unsqueeze(1));
    } else {
      out.add_(delta);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(interpkernels, CompositeExplicitAutograd, m) {
  m.impl("masked_component_forward", &masked_component_forward);
}

}  // namespace interpkernels
