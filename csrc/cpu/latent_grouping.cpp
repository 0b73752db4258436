#include "cpu/latent_grouping.h"

#include <omp.h>

#include <algorithm>
#include <limits>

namespace interpkernels::cpu {

void check_indices_in_range(const at::Tensor& indices, int64_t num_latents, const char* argument) {
  const at::Tensor flat = indices.contiguous();
  const int64_t* data = flat.data_ptr<int64_t>();
  const int64_t count = flat.numel();
  int64_t lowest = std::numeric_limits<int64_t>::max();
  int64_t highest = std::numeric_limits<int64_t>::min();
#pragma omp parallel for reduction(min : lowest) reduction(max : highest) schedule(static)
  for (int64_t e = 0; e < count; ++e) {
    lowest = std::min(lowest, data[e]);
    highest = std::max(highest, data[e]);
  }
  if (count == 0) return;
  TORCH_CHECK_INDEX(lowest >= 0 && highest < num_latents, argument, ": expected every index in [0, ",
                    num_latents, "), got values from ", lowest, " to ", highest);
}

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
