#include "checks.h"

namespace interpkernels {

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
  const at::Tensor bounds = at::stack({lowest, highest}).cpu();  // both bounds in one copy
  const int64_t* bound = bounds.const_data_ptr<int64_t>();
  TORCH_CHECK_INDEX(bound[0] >= 0 && bound[1] < num_latents, argument, ": expected every index in [0, ",
                    num_latents, "), got values from ", bound[0], " to ", bound[1]);
}

}  // namespace interpkernels
