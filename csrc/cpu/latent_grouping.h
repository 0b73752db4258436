#pragma once
// Helpers shared by the CPU kernels that read a sparse code
// (values [N, k], indices [N, k] int64 into M latents).
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace interpkernels::cpu {

// Raises IndexError (through TORCH_CHECK_INDEX) naming `argument` unless every
// index lies in [0, num_latents). One parallel min/max pass: the check reads
// data, so it lives in the op, where torch.compile can trace around it.
void check_indices_in_range(const at::Tensor& indices, int64_t num_latents, const char* argument);

// The N*k entries of a sparse code grouped by latent (CSR of its transpose):
// entries of latent i are entry_order[offsets[i] .. offsets[i+1]), flat
// positions n*k + j in increasing order. Built by a counting sort, so the
// grouping, and every reduction that walks it, is deterministic.
struct LatentGroups {
  std::vector<int64_t> offsets;      // [M + 1]
  std::vector<int64_t> entry_order;  // [N * k]
};

LatentGroups group_by_latent(const at::Tensor& indices, int64_t num_latents);

}  // namespace interpkernels::cpu
