// CPU kernel for the TopK encoder (SPEC.md §1):
//   pre[n, i]   = (x[n] - pre_bias) . W_enc[i] + b_enc[i]
//   indices[n]  = the k largest pre[n, :] over latents latent_mask keeps in
//                 (ties: the lower latent index wins)
//   values[n,j] = relu(pre[n, indices[n, j]]), each row sorted by decreasing pre.
//
// pre [N, M] is never materialized: latents are processed in tiles of
// kLatentTile, each tile's pre-activations computed by one GEMM over a block of
// kRowTile rows, then merged into a running top-k per row (a min-heap whose
// root is the current k-th best). Extra memory is O(N*k + kRowTile*kLatentTile).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace interpkernels::cpu {
namespace {

// 1024 x 2048 fp32 pre-activations = 8 MiB: big enough for an efficient GEMM,
// small beside the N*M matrix it replaces.
constexpr int64_t kRowTile = 1024;
constexpr int64_t kLatentTile = 2048;

template <typename acc_t>
struct Candidate {
  acc_t value;
  int64_t latent;
};

// Strict order "a ranks above b": larger pre-activation, ties to the lower index.
template <typename acc_t>
bool ranks_above(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.value > b.value || (a.value == b.value && a.latent < b.latent);
}

// Merges one row's tile of pre-activations into its running top-k. Latents
// arrive in increasing index order, so a candidate equal to the heap root has
// the higher index and loses: only strictly greater values enter.
template <typename acc_t>
void merge_tile_into_row(const acc_t* pre, int64_t tile_width, int64_t first_latent, const bool* latent_mask,
                         int64_t k, Candidate<acc_t>* heap, int64_t& heap_size) {
  auto heap_end = [&] { return heap + heap_size; };
  int64_t c = 0;
  for (; c < tile_width && heap_size < k; ++c) {
    if (latent_mask && !latent_mask[first_latent + c]) continue;
    heap[heap_size++] = {pre[c], first_latent + c};
    std::push_heap(heap, heap_end(), ranks_above<acc_t>);
  }
  if (heap_size < k) return;
  acc_t threshold = heap[0].value;
  for (; c < tile_width; ++c) {
    if (!(pre[c] > threshold)) continue;
    if (latent_mask && !latent_mask[first_latent + c]) continue;
    std::pop_heap(heap, heap + k, ranks_above<acc_t>);
    heap[k - 1] = {pre[c], first_latent + c};
    std::push_heap(heap, heap + k, ranks_above<acc_t>);
    threshold = heap[0].value;
  }
}

template <typename scalar_t, typename acc_t>
void write_sorted_code(Candidate<acc_t>* heaps, int64_t N, int64_t k, scalar_t* values, int64_t* indices) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    Candidate<acc_t>* row = heaps + n * k;
    std::sort(row, row + k, ranks_above<acc_t>);
    for (int64_t j = 0; j < k; ++j) {
      values[n * k + j] = static_cast<scalar_t>(std::max(row[j].value, acc_t(0)));
      indices[n * k + j] = row[j].latent;
    }
  }
}

template <typename acc_t>
void merge_tile(const acc_t* pre, int64_t rows, int64_t tile_width, int64_t first_latent, const bool* latent_mask,
                int64_t k, Candidate<acc_t>* heaps, int64_t* heap_sizes) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    merge_tile_into_row(pre + r * tile_width, tile_width, first_latent, latent_mask, k, heaps + r * k, heap_sizes[r]);
}

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                   const at::Tensor& b_enc, int64_t k,
                                                   const std::optional<at::Tensor>& pre_bias,
                                                   const std::optional<at::Tensor>& latent_mask) {
  check_topk_encode_args(x, W_enc, b_enc, k, pre_bias, latent_mask);
  const int64_t N = x.size(0), M = W_enc.size(0);
  const at::Tensor mask = latent_mask.has_value() ? latent_mask->contiguous() : at::Tensor();

  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor centered = (pre_bias.has_value() ? x - *pre_bias : x).to(acc_type).contiguous();
  const at::Tensor bias = b_enc.to(acc_type);
  at::Tensor values = at::empty({N, k}, x.options());
  at::Tensor indices = at::empty({N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {values, indices};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_encode_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<Candidate<acc_t>> heaps(N * k);
    std::vector<int64_t> heap_sizes(N, 0);
    at::Tensor pre_buffer = at::empty({std::min(N, kRowTile) * std::min(M, kLatentTile)}, centered.options());
    const bool* mask_data = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    for (int64_t first_latent = 0; first_latent < M; first_latent += kLatentTile) {
      const int64_t tile_width = std::min(kLatentTile, M - first_latent);
      const at::Tensor weight_tile = W_enc.narrow(0, first_latent, tile_width).to(acc_type);
      const at::Tensor bias_tile = bias.narrow(0, first_latent, tile_width);
      for (int64_t first_row = 0; first_row < N; first_row += kRowTile) {
        const int64_t rows = std::min(kRowTile, N - first_row);
        at::Tensor pre = pre_buffer.narrow(0, 0, rows * tile_width).view({rows, tile_width});
        at::addmm_out(pre, bias_tile, centered.narrow(0, first_row, rows), weight_tile.t());
        merge_tile(pre.data_ptr<acc_t>(), rows, tile_width, first_latent, mask_data, k, heaps.data() + first_row * k,
                   heap_sizes.data() + first_row);
      }
    }
    write_sorted_code(heaps.data(), N, k, values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(interpkernels, CPU, m) { m.impl("topk_encode", &topk_encode_cpu); }

}  // namespace interpkernels::cpu
