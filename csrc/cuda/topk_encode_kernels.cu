#include "topk_encode_kernels.cuh"
#include "conversions.cuh"

#include <algorithm>
#include <climits>

namespace interpkernels::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;
// One block per row. The block size must be exactly kThreads: tiles are
// indexed with it.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
// Latents each thread loads before using any, so that several loads per
// thread are in flight in every pass over a row.
constexpr int kItemsPerThread = 4;
constexpr int64_t kTile = int64_t{kThreads} * kItemsPerThread;
constexpr int kDigitBits = 8;
constexpr int kRadix = 1 << kDigitBits;
constexpr int kBinsPerLane = kRadix / kWarpSize;
// Rows are grid-strided past this many blocks, which keeps the grid size an int.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
// Latent indices are packed into the low 32 bits of a sort entry (see sort_entry).
constexpr int64_t kMaxLatents = INT32_MAX;

static_assert(kWarps <= kWarpSize, "one warp scans the per-warp counts");
static_assert(kRadix % kWarpSize == 0, "each lane owns whole bins");
// Per-warp counts of a sweep (<= kWarpSize) and their block totals (<= kThreads)
// are packed as two 16-bit halves.
static_assert(kThreads < (1 << 16));

// The rank of a latent as a 33-bit key, larger first: bit 32 is the tier
// (set for NaN, for pre > threshold[latent], and for every latent without a
// threshold), bits 0..31 an order-preserving image of pre: a > b as floats iff
// image(a) > image(b) as unsigned integers. Setting the sign bit of a
// non-negative float and flipping every bit of a negative one turns
// sign-magnitude into offset binary. -0 is folded into +0 so the two tie, as
// they compare equal; every NaN maps to 0xFFC00000, above +inf's 0xFF800000.
constexpr uint64_t kUpperTier = uint64_t{1} << 32;
constexpr uint32_t kNaNImage = 0xFFC00000u;

__device__ __forceinline__ uint64_t rank_key(float value, const float* __restrict__ threshold, int64_t latent) {
  if (isnan(value)) return kUpperTier | kNaNImage;
  uint32_t bits = __float_as_uint(value);
  if (bits == 0x80000000u) bits = 0;
  const uint32_t image = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  const bool upper = threshold == nullptr || value > threshold[latent];
  return (upper ? kUpperTier : 0) | image;
}

// pre from the image half of a rank key; NaN's image maps back to a NaN.
__device__ __forceinline__ float float_of_key(uint64_t key) {
  const uint32_t image = static_cast<uint32_t>(key);
  return __uint_as_float((image & 0x80000000u) ? image & 0x7FFFFFFFu : ~image);
}

// A selected latent as one integer whose decreasing order is the output
// order: larger key first, then lower latent (2^31 - 1 - latent in the low 31
// bits). Latents are below 2^31 - 1, so those bits are never all zero and no
// real entry is 0, the mark of an empty slot.
constexpr uint32_t kLatentBits = 0x7FFFFFFFu;

__device__ __forceinline__ uint64_t sort_entry(uint64_t key, int64_t latent) {
  return (key << 31) | (kLatentBits - static_cast<uint32_t>(latent));
}

__device__ __forceinline__ int64_t latent_of_entry(uint64_t entry) {
  return kLatentBits - static_cast<uint32_t>(entry & kLatentBits);
}

// Where the radix select of a row stands. The keys of kept latents split by
// their bits under `mask` (the digits fixed so far): the `greater` keys whose
// masked bits exceed `prefix` are all selected; of the boundary group, whose
// masked bits equal `prefix`, the `remaining` of largest key are, ties to the
// lower latent. `done`: the boundary group needs no more digits, because all
// of it is taken or all of its keys are equal.
struct Selection {
  uint64_t prefix;
  uint64_t mask;
  uint32_t greater;
  uint32_t remaining;
  bool done;
};

// Static shared memory of the kernel. The sort entries are dynamic shared
// memory after it.
struct RowShared {
  uint32_t histogram[kRadix];
  uint32_t warp_counts[2][kWarps];  // double-buffered by sweep parity
  Selection selection;
};

// Keys of this thread's items in the tile that starts at latent `base`: item
// j is latent base + j * kThreads + threadIdx.x, so each item index is one
// coalesced sweep over kThreads consecutive latents. Latents past the row end
// or masked out are not valid.
__device__ __forceinline__ void load_tile(const float* __restrict__ row,
                                          const bool* __restrict__ latent_mask,
                                          const float* __restrict__ threshold, int64_t M,
                                          int64_t base, uint64_t (&keys)[kItemsPerThread],
                                          bool (&valid)[kItemsPerThread]) {
#pragma unroll
  for (int j = 0; j < kItemsPerThread; ++j) {
    const int64_t latent = base + j * kThreads + threadIdx.x;
    // The mask and the key are loaded independently so neither waits on the other.
    const bool in_row = latent < M;
    const float value = in_row ? row[latent] : 0.f;
    valid[j] = in_row && (latent_mask == nullptr || latent_mask[latent]);
    keys[j] = rank_key(value, in_row ? threshold : nullptr, latent);
  }
}

// histogram[b] = the number of boundary-group keys whose digit at `shift` is
// b. Lanes holding one digit add their count in one atomic (__match_any_sync):
// the high digits of a row are few (sign and exponent), and one shared-memory
// address hit by a whole warp would serialize it. Counts are order-free sums,
// so the atomics do not make the result vary.
__device__ __forceinline__ void count_digits(const float* __restrict__ row,
                                             const bool* __restrict__ latent_mask,
                                             const float* __restrict__ threshold, int64_t M,
                                             const Selection& selection, int shift,
                                             uint32_t* histogram) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t base = 0; base < M; base += kTile) {
    uint64_t keys[kItemsPerThread];
    bool valid[kItemsPerThread];
    load_tile(row, latent_mask, threshold, M, base, keys, valid);
#pragma unroll
    for (int j = 0; j < kItemsPerThread; ++j) {
      const bool counted = valid[j] && (keys[j] & selection.mask) == selection.prefix;
      const unsigned voters = __ballot_sync(kFullWarp, counted);
      if (counted) {
        const uint32_t digit = static_cast<uint32_t>(keys[j] >> shift) & (kRadix - 1);
        const unsigned peers = __match_any_sync(voters, digit);
        if (lane == __ffs(peers) - 1) {
          atomicAdd(&histogram[digit], static_cast<unsigned>(__popc(peers)));
        }
      }
    }
  }
}

// Run by warp 0 after count_digits: narrows the boundary group to the keys
// whose digit at `shift` is the digit b of its remaining-th largest key, i.e.
// the one b with above(b) < remaining <= above(b) + histogram[b], where
// above(b) counts the group's keys of digit above b. Lane l owns bins
// [l * kBinsPerLane, (l + 1) * kBinsPerLane); exactly one lane finds b.
__device__ void choose_digit(RowShared& shared, int shift) {
  const int lane = threadIdx.x;
  Selection& selection = shared.selection;
  // Read before the shuffles below, which every lane passes before one writes.
  const uint32_t remaining = selection.remaining;
  uint32_t counts[kBinsPerLane];
  uint32_t lane_total = 0;
#pragma unroll
  for (int b = 0; b < kBinsPerLane; ++b) {
    counts[b] = shared.histogram[lane * kBinsPerLane + b];
    lane_total += counts[b];
  }
  uint32_t suffix = lane_total;  // becomes the sum over lanes >= lane
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const uint32_t other = __shfl_down_sync(kFullWarp, suffix, offset);
    if (lane + offset < kWarpSize) suffix += other;
  }
  const uint32_t group_size = __shfl_sync(kFullWarp, suffix, 0);
  if (group_size <= remaining) {
    // Only in the first round, when k >= the kept latents: take them all.
    if (lane == 0) {
      selection.remaining = group_size;
      selection.done = true;
    }
    return;
  }
  uint32_t above = suffix - lane_total;
#pragma unroll
  for (int b = kBinsPerLane - 1; b >= 0; --b) {
    if (above < remaining && remaining <= above + counts[b]) {
      const uint32_t digit = static_cast<uint32_t>(lane * kBinsPerLane + b);
      selection.prefix |= static_cast<uint64_t>(digit) << shift;
      selection.mask |= static_cast<uint64_t>(kRadix - 1) << shift;
      selection.greater += above;
      selection.remaining = remaining - above;
      selection.done = counts[b] == remaining - above || shift == 0;
    }
    above += counts[b];
  }
}

// Writes the sort entries of the selection of a row: the `greater` latents
// above the boundary group to slots [0, greater), and the first `remaining`
// of the group in increasing latent order, which is the lower-index tie rule,
// to [greater, greater + remaining). Slots come from block-wide ordered counts
// (ballots, then a scan over warps), so every run fills the same slots. Stops
// after the tile in which both kinds are complete.
__device__ __forceinline__ void gather_selection(const float* __restrict__ row,
                                                 const bool* __restrict__ latent_mask,
                                                 const float* __restrict__ threshold, int64_t M,
                                                 const Selection& selection, RowShared& shared,
                                                 uint64_t* entries) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const unsigned lower_lanes = (1u << lane) - 1;
  uint32_t greater_base = 0;  // entries of each kind in earlier sweeps
  uint32_t group_base = 0;
  int parity = 0;
  for (int64_t base = 0;
       base < M && (greater_base < selection.greater || group_base < selection.remaining);
       base += kTile) {
    uint64_t keys[kItemsPerThread];
    bool valid[kItemsPerThread];
    load_tile(row, latent_mask, threshold, M, base, keys, valid);
#pragma unroll
    for (int j = 0; j < kItemsPerThread; ++j) {
      const uint64_t masked = keys[j] & selection.mask;
      const bool is_greater = valid[j] && masked > selection.prefix;
      const bool in_group = valid[j] && masked == selection.prefix;
      const unsigned greater_votes = __ballot_sync(kFullWarp, is_greater);
      const unsigned group_votes = __ballot_sync(kFullWarp, in_group);
      // Double buffering makes one barrier per sweep enough: a warp writes
      // this buffer again two sweeps later, after the next barrier, which
      // every warp reaches only once done reading it.
      uint32_t* counts = shared.warp_counts[parity];
      if (lane == 0) counts[warp] = (__popc(greater_votes) << 16) | __popc(group_votes);
      __syncthreads();
      const uint32_t count = lane < kWarps ? counts[lane] : 0;
      uint32_t inclusive = count;
#pragma unroll
      for (int offset = 1; offset < kWarpSize; offset <<= 1) {
        const uint32_t other = __shfl_up_sync(kFullWarp, inclusive, offset);
        if (lane >= offset) inclusive += other;
      }
      const uint32_t before = __shfl_sync(kFullWarp, inclusive - count, warp);
      const uint32_t sweep_total = __shfl_sync(kFullWarp, inclusive, kWarpSize - 1);
      const int64_t latent = base + j * kThreads + threadIdx.x;
      if (is_greater) {
        // < greater: the histograms counted exactly that many such keys.
        const uint32_t slot = greater_base + (before >> 16) + __popc(greater_votes & lower_lanes);
        entries[slot] = sort_entry(keys[j], latent);
      }
      if (in_group) {
        const uint32_t rank = group_base + (before & 0xFFFFu) + __popc(group_votes & lower_lanes);
        if (rank < selection.remaining) {
          entries[selection.greater + rank] = sort_entry(keys[j], latent);
        }
      }
      greater_base += sweep_total >> 16;
      group_base += sweep_total & 0xFFFFu;
      parity ^= 1;
    }
  }
}

// Sorts entries[0, size) into decreasing order, size a power of two: a
// bitonic network whose compare-exchange pairs of each step are split over
// the block. Ends with a barrier.
__device__ void sort_descending(uint64_t* entries, uint32_t size) {
  for (uint32_t span = 2; span <= size; span <<= 1) {
    for (uint32_t stride = span >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (uint32_t pair = threadIdx.x; pair < size / 2; pair += kThreads) {
        // Pairs (i, i + stride) with bit `stride` of i clear; runs of `span`
        // alternate direction, and the last run, all of [0, size), descends.
        const uint32_t i = 2 * pair - (pair & (stride - 1));
        const bool descending = (i & span) == 0;
        const uint64_t a = entries[i];
        const uint64_t b = entries[i + stride];
        if ((a < b) == descending) {
          entries[i] = b;
          entries[i + stride] = a;
        }
      }
    }
  }
  __syncthreads();
}

// One block per row (grid-strided). Per row: a radix select over the 33-bit
// rank keys, most significant digit first (without a threshold every key has
// the tier bit, so the select starts below it), fixes the boundary group (the keys that
// share the k-th largest key's bits under the mask); one more pass gathers
// the keys above it and the group's first latents into shared memory, which
// is then sorted and written out. A round ends the select early when the
// whole boundary group is taken.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    topk_select_kernel(const float* __restrict__ pre, const bool* __restrict__ latent_mask,
                       const float* __restrict__ threshold, int64_t N, int64_t M, uint32_t k,
                       uint32_t sort_size,
                       scalar_t* __restrict__ values, int64_t* __restrict__ indices) {
  __shared__ RowShared shared;
  extern __shared__ uint64_t entries[];  // sort_size entries

  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const float* row = pre + n * M;
    __syncthreads();  // the previous row is done with shared memory
    const uint64_t tier_mask = static_cast<uint64_t>(kRadix - 1) << 32;
    if (threadIdx.x == 0) {
      shared.selection = threshold == nullptr ? Selection{kUpperTier, tier_mask, 0, k, false}
                                              : Selection{0, 0, 0, k, false};
    }
    for (uint32_t s = threadIdx.x; s < sort_size; s += kThreads) entries[s] = 0;

    for (int shift = threshold == nullptr ? 32 - kDigitBits : 32; shift >= 0; shift -= kDigitBits) {
      for (int b = threadIdx.x; b < kRadix; b += kThreads) shared.histogram[b] = 0;
      __syncthreads();
      const Selection selection = shared.selection;
      count_digits(row, latent_mask, threshold, M, selection, shift, shared.histogram);
      __syncthreads();
      if (threadIdx.x < kWarpSize) choose_digit(shared, shift);
      __syncthreads();
      if (shared.selection.done) break;  // set at shift 0 at the latest
    }

    const Selection selection = shared.selection;
    gather_selection(row, latent_mask, threshold, M, selection, shared, entries);
    sort_descending(entries, sort_size);

    for (uint32_t j = threadIdx.x; j < k; j += kThreads) {
      const uint64_t entry = entries[j];
      const int64_t out = n * k + j;
      if (entry == 0) {  // the row kept fewer than k latents
        values[out] = from_float<scalar_t>(0.f);
        indices[out] = -1;
        continue;
      }
      const float value = float_of_key(entry >> 31);
      values[out] = from_float<scalar_t>(value < 0.f ? 0.f : value);  // relu that keeps NaN
      indices[out] = latent_of_entry(entry);
    }
  }
}

uint32_t next_power_of_two(uint32_t x) {
  uint32_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

}  // namespace

cudaError_t topk_select_max_k(int64_t* max_k) {
  if (max_k == nullptr) return cudaErrorInvalidValue;
  int device = 0;
  int optin_bytes = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  status = cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return status;
  const int64_t capacity =
      (static_cast<int64_t>(optin_bytes) - static_cast<int64_t>(sizeof(RowShared))) /
      static_cast<int64_t>(sizeof(uint64_t));
  int64_t size = 1;
  while (size * 2 <= capacity) size *= 2;
  *max_k = size;
  return cudaSuccess;
}

template <typename scalar_t>
cudaError_t launch_topk_select(const float* pre, const bool* latent_mask, const float* threshold, int64_t N,
                               int64_t M, int64_t k, scalar_t* values, int64_t* indices, cudaStream_t stream) {
  int64_t max_k = 0;
  cudaError_t status = topk_select_max_k(&max_k);
  if (status != cudaSuccess) return status;
  if (N < 0 || M > kMaxLatents || k < 1 || k > M || k > max_k) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;

  // Always allowed the largest size, not this launch's: every caller then
  // sets the same value, so concurrent launches from several host threads
  // cannot lower it under one another.
  status = cudaFuncSetAttribute(topk_select_kernel<scalar_t>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(max_k * static_cast<int64_t>(sizeof(uint64_t))));
  if (status != cudaSuccess) return status;
  const uint32_t sort_size = next_power_of_two(static_cast<uint32_t>(k));
  const int grid = static_cast<int>(std::min(N, kMaxBlocks));
  topk_select_kernel<scalar_t><<<grid, kThreads, sort_size * sizeof(uint64_t), stream>>>(
      pre, latent_mask, threshold, N, M, static_cast<uint32_t>(k), sort_size, values, indices);
  return cudaGetLastError();
}

#define INTERPKERNELS_INSTANTIATE(scalar_t)                                                     \
  template cudaError_t launch_topk_select<scalar_t>(const float*, const bool*, const float*,    \
                                                    int64_t, int64_t, int64_t, scalar_t*,      \
                                                    int64_t*, cudaStream_t);

INTERPKERNELS_INSTANTIATE(float)
INTERPKERNELS_INSTANTIATE(__half)
INTERPKERNELS_INSTANTIATE(__nv_bfloat16)

#undef INTERPKERNELS_INSTANTIATE

}  // namespace interpkernels::cuda
