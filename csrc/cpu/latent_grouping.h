#pragma once
// Helpers shared by the CPU kernels that read a sparse code
// (values [N, k], indices [N, k] int64 into M latents).
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace interpkernels::cpu {

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
