#pragma once
// Helpers shared by the CPU kernels that read a sparse code
// (values [N, k], indices [N, k] int64 into M latents).
#include <ATen/ATen.h>

#include <cstdint>

namespace interpkernels::cpu {

// The N*k entries of a sparse code grouped by latent (CSR of its transpose),
// in the layout of the latent_grouping op (csrc/ops.cpp): one int64 tensor
// [M + 1 + N*k], offsets then entry order; entries of latent i are the flat
// positions n*k + j in increasing order. Built by a counting sort, so the
// grouping, and every reduction that walks it, is deterministic.
at::Tensor group_by_latent(const at::Tensor& indices, int64_t num_latents);

// Views into such a grouping.
struct LatentGroups {
  const int64_t* offsets;      // [M + 1]
  const int64_t* entry_order;  // [N * k]
};

inline LatentGroups latent_groups(const at::Tensor& grouping, int64_t num_latents) {
  const int64_t* data = grouping.const_data_ptr<int64_t>();
  return {data, data + num_latents + 1};
}

}  // namespace interpkernels::cpu
