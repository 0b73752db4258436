#include "sparse_decode_kernels.cuh"
#include "conversions.cuh"

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include <cub/device/device_radix_sort.cuh>

namespace interpkernels::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
// Grids are capped here and kernels grid-stride over the rest: 2^20 blocks
// are far more than an H100's 132 SMs hold at once, and the cap keeps the
// grid size an int whatever N, M or N*k are.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
constexpr int kVectorBytes = 16;
// cub and our own buffers start on this boundary inside the workspace.
constexpr size_t kWorkspaceAlignment = 256;

template <typename scalar_t>
constexpr int kVectorWidth = kVectorBytes / static_cast<int>(sizeof(scalar_t));

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int grid_size(int64_t work_items) {
  return static_cast<int>(std::min(std::max<int64_t>(work_items, 1), kMaxBlocks));
}

bool is_vector_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kVectorBytes == 0;
}

// VEC consecutive elements moved by one access: a 16-byte vector when VEC is
// the full vector width, a plain scalar when VEC == 1. The store is the
// __stwb intrinsic (an ordinary write-back st.global.v4) because nvcc splits
// a plain uint4 store in the kernels below into four 4-byte stores.
template <typename scalar_t, int VEC>
struct Vec {
  static_assert(VEC == 1 || VEC * sizeof(scalar_t) == sizeof(uint4));
  scalar_t v[VEC];
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ Vec<scalar_t, VEC> load_vec(const scalar_t* ptr) {
  Vec<scalar_t, VEC> vec;
  if constexpr (VEC == 1) {
    vec.v[0] = *ptr;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
    memcpy(&vec, &raw, sizeof(vec));
  }
  return vec;
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void store_vec(scalar_t* ptr, const Vec<scalar_t, VEC>& vec) {
  if constexpr (VEC == 1) {
    *ptr = vec.v[0];
  } else {
    unsigned int words[4];
    memcpy(words, &vec, sizeof(words));
    __stwb(reinterpret_cast<uint4*>(ptr), make_uint4(words[0], words[1], words[2], words[3]));
  }
}

// The vector path needs every row start aligned: the base pointers at 16
// bytes, and the row stride d * sizeof(scalar_t) a multiple of 16, i.e.
// d % VEC == 0 (which also means a row has no partial vector at its tail).
template <typename scalar_t>
bool can_vectorize(int64_t d, std::initializer_list<const void*> row_bases) {
  return d % kVectorWidth<scalar_t> == 0 &&
         std::all_of(row_bases.begin(), row_bases.end(),
                     [](const void* p) { return p == nullptr || is_vector_aligned(p); });
}

// Entries of output row n in the forward decode: j = 0..k-1, scaled row
// indices[n, j] of the weight.
template <typename scalar_t>
struct RowMajorCode {
  const scalar_t* values;
  const int64_t* indices;
  int64_t k;

  __device__ int64_t begin(int64_t n) const { return n * k; }
  __device__ int64_t end(int64_t n) const { return n * k + k; }
  __device__ void load(int64_t p, float& value, int64_t& source_row) const {
    value = to_float(values[p]);
    source_row = indices[p];
  }
};

// Entries of latent i in the transposed product: the CSR segment of i; flat
// entry e scales row e / k (its token) of the dense input.
template <typename scalar_t>
struct GroupedCode {
  const scalar_t* values;
  const int64_t* offsets;
  const int64_t* entry_order;
  int64_t k;

  __device__ int64_t begin(int64_t i) const { return offsets[i]; }
  __device__ int64_t end(int64_t i) const { return offsets[i + 1]; }
  __device__ void load(int64_t p, float& value, int64_t& source_row) const {
    const int64_t e = entry_order[p];
    value = to_float(values[e]);
    source_row = e / k;
  }
};

// For every output row r, with (value_p, row_p) the entries of r in order:
//   out[r, c]     = Σ_p value_p · source[row_p, c] + bias[c]   (bias optional)
//   value_sums[r] = Σ_p value_p                                (optional)
// One block handles one (row, column tile) work item at a time; each thread
// owns VEC adjacent columns and keeps VEC float accumulators, so every sum is
// a sequential reduction in entry order. Entries are staged through shared
// memory blockDim.x at a time so each is read from global memory once per
// block, not once per thread. The tile count per row spreads wide rows over
// several blocks; a row's entry list is uniform across its block, which keeps
// the __syncthreads below legal.
template <typename scalar_t, int VEC, typename Code>
__global__ void __launch_bounds__(kMaxThreads)
    weighted_row_sum_kernel(Code code, const scalar_t* __restrict__ source,
                            const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                            scalar_t* __restrict__ value_sums, int64_t rows, int64_t d,
                            int64_t tiles_per_row) {
  __shared__ float staged_value[kMaxThreads];
  __shared__ int64_t staged_row[kMaxThreads];

  const int64_t tile_width = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t work_items = rows * tiles_per_row;
  for (int64_t work = blockIdx.x; work < work_items; work += gridDim.x) {
    const int64_t row = work / tiles_per_row;
    const int64_t tile = work - row * tiles_per_row;
    const int64_t col = tile * tile_width + static_cast<int64_t>(threadIdx.x) * VEC;
    const bool owns_columns = col < d;  // col + VEC <= d too: VEC == 1 or d % VEC == 0
    const bool writes_value_sum = value_sums != nullptr && tile == 0 && threadIdx.x == 0;

    float acc[VEC] = {};
    float value_sum = 0.f;
    const int64_t begin = code.begin(row);
    const int64_t end = code.end(row);
    for (int64_t chunk = begin; chunk < end; chunk += blockDim.x) {
      const int64_t remaining = end - chunk;
      const int count = static_cast<int>(remaining < blockDim.x ? remaining : blockDim.x);
      __syncthreads();  // the previous chunk or work item is done with the stage
      if (static_cast<int>(threadIdx.x) < count) {
        code.load(chunk + threadIdx.x, staged_value[threadIdx.x], staged_row[threadIdx.x]);
      }
      __syncthreads();
      if (owns_columns) {
#pragma unroll 4
        for (int i = 0; i < count; ++i) {
          const float value = staged_value[i];
          const Vec<scalar_t, VEC> x = load_vec<VEC>(source + staged_row[i] * d + col);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] = fmaf(value, to_float(x.v[v]), acc[v]);
        }
      }
      if (writes_value_sum) {
        for (int i = 0; i < count; ++i) value_sum += staged_value[i];
      }
    }

    if (owns_columns) {
      Vec<scalar_t, VEC> result;
      if (bias != nullptr) {
        const Vec<scalar_t, VEC> b = load_vec<VEC>(bias + col);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += to_float(b.v[v]);
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) result.v[v] = from_float<scalar_t>(acc[v]);
      store_vec<VEC>(out + row * d + col, result);
    }
    if (writes_value_sum) value_sums[row] = from_float<scalar_t>(value_sum);
  }
}

template <typename scalar_t, int VEC, typename Code>
cudaError_t launch_weighted_row_sum_vec(const Code& code, const scalar_t* source,
                                        const scalar_t* bias, scalar_t* out,
                                        scalar_t* value_sums, int64_t rows, int64_t d,
                                        cudaStream_t stream) {
  // Split a row into the fewest tiles of <= kMaxThreads threads, then size the
  // block to the tile so that d = 2304 does not become one full and one
  // nearly empty tile. At least one tile: value_sums is written even if d == 0.
  const int64_t vectors_per_row = ceil_div(d, VEC);
  const int64_t tiles_per_row = std::max<int64_t>(1, ceil_div(vectors_per_row, kMaxThreads));
  const int64_t vectors_per_tile = ceil_div(vectors_per_row, tiles_per_row);
  const int threads =
      static_cast<int>(std::max<int64_t>(1, ceil_div(vectors_per_tile, kWarpSize)) * kWarpSize);
  weighted_row_sum_kernel<scalar_t, VEC><<<grid_size(rows * tiles_per_row), threads, 0, stream>>>(
      code, source, bias, out, value_sums, rows, d, tiles_per_row);
  return cudaGetLastError();
}

template <typename scalar_t, typename Code>
cudaError_t launch_weighted_row_sum(const Code& code, const scalar_t* source,
                                    const scalar_t* bias, scalar_t* out, scalar_t* value_sums,
                                    int64_t rows, int64_t d, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (can_vectorize<scalar_t>(d, {source, bias, out})) {
    return launch_weighted_row_sum_vec<scalar_t, kVectorWidth<scalar_t>>(
        code, source, bias, out, value_sums, rows, d, stream);
  }
  return launch_weighted_row_sum_vec<scalar_t, 1>(code, source, bias, out, value_sums, rows, d,
                                                  stream);
}

constexpr int kDotWarpsPerBlock = kMaxThreads / kWarpSize;

// out[e] = Σ_c weight[indices[e], c] · dense[e / k, c] for every flat entry e
// of the [N, k] code. One warp per entry: lanes stride over d with VEC-wide
// loads, each keeping a sequential partial sum, then a fixed xor-butterfly
// combines the 32 partials, so the result is the same on every run. The warps
// of a block take consecutive entries, which mostly share a token, so its
// dense row is served from L1.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    gathered_dot_kernel(const scalar_t* __restrict__ dense, const int64_t* __restrict__ indices,
                        const scalar_t* __restrict__ weight, scalar_t* __restrict__ out,
                        int64_t num_entries, int64_t k, int64_t d) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kDotWarpsPerBlock;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kDotWarpsPerBlock + threadIdx.x / kWarpSize;
       e < num_entries; e += warp_stride) {
    const scalar_t* w = weight + indices[e] * d;
    const scalar_t* x = dense + (e / k) * d;
    float sum = 0.f;
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < d; c += kWarpSize * VEC) {
      const Vec<scalar_t, VEC> wv = load_vec<VEC>(w + c);
      const Vec<scalar_t, VEC> xv = load_vec<VEC>(x + c);
#pragma unroll
      for (int v = 0; v < VEC; ++v) sum = fmaf(to_float(wv.v[v]), to_float(xv.v[v]), sum);
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (lane == 0) out[e] = from_float<scalar_t>(sum);
  }
}

template <typename scalar_t, int VEC>
cudaError_t launch_gathered_dot_vec(const scalar_t* dense, const int64_t* indices,
                                    const scalar_t* weight, scalar_t* out, int64_t num_entries,
                                    int64_t k, int64_t d, cudaStream_t stream) {
  gathered_dot_kernel<scalar_t, VEC>
      <<<grid_size(ceil_div(num_entries, kDotWarpsPerBlock)), kMaxThreads, 0, stream>>>(
          dense, indices, weight, out, num_entries, k, d);
  return cudaGetLastError();
}

// Sort keys: latents fit in 32 bits, which halves the key traffic of the sort.
// Positions are the payload the stable sort carries into entry_order.
__global__ void prepare_sort_kernel(const int64_t* __restrict__ indices, int64_t num_entries,
                                    uint32_t* __restrict__ keys, int64_t* __restrict__ positions) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < num_entries;
       e += stride) {
    keys[e] = static_cast<uint32_t>(indices[e]);
    positions[e] = e;
  }
}

// offsets[i] = number of sorted keys < i, for i = 0..num_latents: the CSR row
// pointers, found by binary search so no counter is shared between threads.
__global__ void segment_offsets_kernel(const uint32_t* __restrict__ sorted_keys,
                                       int64_t num_entries, int64_t num_latents,
                                       int64_t* __restrict__ offsets) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i <= num_latents;
       i += stride) {
    int64_t lo = 0;
    int64_t hi = num_entries;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(sorted_keys[mid]) < i) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    offsets[i] = lo;
  }
}

size_t align_up(size_t bytes) {
  return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

// Radix sort over bits [0, end_bit): enough for every key < num_latents.
int key_bits(int64_t num_latents) {
  int bits = 0;
  while (bits < 32 && (uint64_t{1} << bits) < static_cast<uint64_t>(num_latents)) ++bits;
  return bits;
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_sparse_decode_forward(const scalar_t* values, const int64_t* indices,
                                         const scalar_t* weight, const scalar_t* bias,
                                         scalar_t* out, int64_t N, int64_t k, int64_t d,
                                         cudaStream_t stream) {
  if (d == 0) return cudaSuccess;
  return launch_weighted_row_sum(RowMajorCode<scalar_t>{values, indices, k}, weight, bias, out,
                                 static_cast<scalar_t*>(nullptr), N, d, stream);
}

template <typename scalar_t>
cudaError_t launch_gathered_dot(const scalar_t* dense, const int64_t* indices,
                                const scalar_t* weight, scalar_t* out, int64_t N, int64_t k,
                                int64_t d, cudaStream_t stream) {
  const int64_t num_entries = N * k;
  if (num_entries == 0) return cudaSuccess;
  if (can_vectorize<scalar_t>(d, {dense, weight})) {
    return launch_gathered_dot_vec<scalar_t, kVectorWidth<scalar_t>>(dense, indices, weight, out,
                                                                     num_entries, k, d, stream);
  }
  return launch_gathered_dot_vec<scalar_t, 1>(dense, indices, weight, out, num_entries, k, d,
                                              stream);
}

cudaError_t launch_group_by_latent(const int64_t* indices, int64_t num_entries,
                                   int64_t num_latents, int64_t* offsets, int64_t* entry_order,
                                   void* workspace, size_t* workspace_bytes,
                                   cudaStream_t stream) {
  if (workspace_bytes == nullptr || num_entries < 0 || num_latents < 0 ||
      num_latents > (int64_t{1} << 32)) {
    return cudaErrorInvalidValue;
  }
  const int end_bit = key_bits(num_latents);
  const size_t n = static_cast<size_t>(num_entries);
  size_t sort_bytes = 0;
  if (num_entries > 0) {
    const cudaError_t status = cub::DeviceRadixSort::SortPairs(
        nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
        static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), num_entries, 0,
        end_bit, stream);
    if (status != cudaSuccess) return status;
  }
  // Layout: keys | sorted keys | positions | cub scratch. Never zero bytes, so
  // that a caller's allocation of the queried size is never a null pointer
  // that would read as another size query.
  const size_t keys_bytes = align_up(n * sizeof(uint32_t));
  const size_t positions_bytes = align_up(n * sizeof(int64_t));
  const size_t required = std::max(2 * keys_bytes + positions_bytes + sort_bytes, kWorkspaceAlignment);
  if (workspace == nullptr) {
    *workspace_bytes = required;
    return cudaSuccess;
  }
  if (*workspace_bytes < required ||
      reinterpret_cast<uintptr_t>(workspace) % kWorkspaceAlignment != 0) {
    return cudaErrorInvalidValue;
  }

  auto* base = static_cast<unsigned char*>(workspace);
  auto* keys = reinterpret_cast<uint32_t*>(base);
  auto* sorted_keys = reinterpret_cast<uint32_t*>(base + keys_bytes);
  auto* positions = reinterpret_cast<int64_t*>(base + 2 * keys_bytes);
  void* sort_scratch = base + 2 * keys_bytes + positions_bytes;

  if (num_entries > 0) {
    prepare_sort_kernel<<<grid_size(ceil_div(num_entries, kMaxThreads)), kMaxThreads, 0, stream>>>(
        indices, num_entries, keys, positions);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    // LSD radix sort is stable: equal latents keep increasing positions.
    status = cub::DeviceRadixSort::SortPairs(sort_scratch, sort_bytes, keys, sorted_keys,
                                             positions, entry_order, num_entries, 0, end_bit,
                                             stream);
    if (status != cudaSuccess) return status;
  }
  segment_offsets_kernel<<<grid_size(ceil_div(num_latents + 1, kMaxThreads)), kMaxThreads, 0,
                           stream>>>(sorted_keys, num_entries, num_latents, offsets);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_sparse_transpose_matmul(const scalar_t* values, const scalar_t* dense,
                                           const int64_t* offsets, const int64_t* entry_order,
                                           int64_t k, int64_t d, int64_t num_latents,
                                           scalar_t* out, scalar_t* value_sums,
                                           cudaStream_t stream) {
  return launch_weighted_row_sum(GroupedCode<scalar_t>{values, offsets, entry_order, k}, dense,
                                 static_cast<const scalar_t*>(nullptr), out, value_sums,
                                 num_latents, d, stream);
}

#define INTERPKERNELS_INSTANTIATE(scalar_t)                                                     \
  template cudaError_t launch_sparse_decode_forward<scalar_t>(                                  \
      const scalar_t*, const int64_t*, const scalar_t*, const scalar_t*, scalar_t*, int64_t,    \
      int64_t, int64_t, cudaStream_t);                                                           \
  template cudaError_t launch_gathered_dot<scalar_t>(const scalar_t*, const int64_t*,           \
                                                     const scalar_t*, scalar_t*, int64_t,       \
                                                     int64_t, int64_t, cudaStream_t);           \
  template cudaError_t launch_sparse_transpose_matmul<scalar_t>(                                \
      const scalar_t*, const scalar_t*, const int64_t*, const int64_t*, int64_t, int64_t,       \
      int64_t, scalar_t*, scalar_t*, cudaStream_t);

INTERPKERNELS_INSTANTIATE(float)
INTERPKERNELS_INSTANTIATE(__half)
INTERPKERNELS_INSTANTIATE(__nv_bfloat16)

#undef INTERPKERNELS_INSTANTIATE

}  // namespace interpkernels::cuda
