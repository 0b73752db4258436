#include "cpu/latent_grouping.h"

namespace interpkernels::cpu {

LatentGroups group_by_latent(const at::Tensor& indices, int64_t num_latents) {
  const at::Tensor flat = indices.contiguous();
  const int64_t* latent_of = flat.data_ptr<int64_t>();
  const int64_t num_entries = flat.numel();

  LatentGroups groups;
  groups.offsets.assign(num_latents + 1, 0);
  for (int64_t e = 0; e < num_entries; ++e) ++groups.offsets[latent_of[e] + 1];
  for (int64_t i = 0; i < num_latents; ++i) groups.offsets[i + 1] += groups.offsets[i];

  // A serial, stable scatter: entries of one latent keep increasing flat order.
  std::vector<int64_t> cursor(groups.offsets.begin(), groups.offsets.end() - 1);
  groups.entry_order.resize(num_entries);
  for (int64_t e = 0; e < num_entries; ++e) groups.entry_order[cursor[latent_of[e]]++] = e;
  return groups;
}

}  // namespace interpkernels::cpu
