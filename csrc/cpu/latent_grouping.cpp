#include "cpu/latent_grouping.h"

#include <vector>

namespace interpkernels::cpu {

at::Tensor group_by_latent(const at::Tensor& indices, int64_t num_latents) {
  const at::Tensor flat = indices.contiguous();
  const int64_t* latent_of = flat.const_data_ptr<int64_t>();
  const int64_t num_entries = flat.numel();

  at::Tensor grouping = at::zeros({num_latents + 1 + num_entries}, indices.options());
  int64_t* offsets = grouping.mutable_data_ptr<int64_t>();
  int64_t* entry_order = offsets + num_latents + 1;
  for (int64_t e = 0; e < num_entries; ++e) ++offsets[latent_of[e] + 1];
  for (int64_t i = 0; i < num_latents; ++i) offsets[i + 1] += offsets[i];

  // A serial, stable scatter: entries of one latent keep increasing flat order.
  std::vector<int64_t> cursor(offsets, offsets + num_latents);
  for (int64_t e = 0; e < num_entries; ++e) entry_order[cursor[latent_of[e]]++] = e;
  return grouping;
}

}  // namespace interpkernels::cpu
