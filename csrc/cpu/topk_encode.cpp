// CPU kernel for the TopK encoder (docs/OPS.md):
//   pre[n, i]   = (x[n] - pre_bias) . W_enc[i] + b_enc[i]
//   indices[n]  = the k latents of highest rank in row n, over the latents
//                 latent_mask keeps in, in rank order
//   values[n,j] = relu(pre[n, indices[n, j]]) (NaN stays NaN).
// The rank, the same on every backend: a NaN pre first (torch.topk's rule);
// then, given `threshold` [M], latents with pre > threshold[i] before the
// others (JumpReLU's candidates); then larger pre first; then lower latent.
//
// pre [N, M] is never materialized, and it is computed in two arithmetics:
//  - screening: for each block of kRowTile rows, latents stream in tiles of
//    kLatentTile through one ATen GEMM. Its rounding depends on the BLAS, on
//    the tile's shape and on the CPU, so it decides nothing: it only rules out
//    latents that cannot rank among a row's k best.
//  - canonical: the pre of every latent that survives screening is computed
//    again by cpu/vector_math's dot, whose bits depend on the inputs alone.
//    The selection, its order and the values all come from this one.
// So an exact tie breaks to the lower latent wherever the latents sit and on
// whatever CPU: both latents' canonical pre are equal bit for bit.
//
// Why screening is safe. Summed in any order, with or without FMA, a dot
// product of d terms plus a bias is within gamma * S(n) of its exact value,
// where gamma = (d + 2) u / (1 - (d + 2) u), u the unit roundoff, and
//   S(n) = ||x[n] - pre_bias|| * max_i ||W_enc[i]|| + max_i |b_enc[i]|
// (Cauchy-Schwarz; norms and maxima over finite entries). So screened and
// canonical pre differ by at most error(n) = 2 (2 gamma S(n) + underflow),
// twice the bound to absorb the bound's own rounding. A latent is kept
// unless its screened pre plus error(n) ranks below a proven lower bound of
// the row's final k-th key (the "floor"). Rows whose S(n) is not finite or
// could overflow get error(n) = inf: every latent is scored canonically.
// Latents with infinite or NaN weights give +-inf or NaN in any order of
// summation, equally in both arithmetics, so their margin is zero.
//
// Extra memory: one GEMM tile (8 MiB) and, for the kRowTile rows in flight,
// their candidates (2k + 64 each) and exact top-k.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "outputs.h"
#include "cpu/parallel.h"
#include "cpu/vector_math.h"

namespace interpkernels::cpu {
namespace {

// 1024 x 2048 fp32 pre-activations = 8 MiB: big enough for an efficient GEMM,
// small beside the N*M matrix it replaces.
constexpr int64_t kRowTile = 1024;
constexpr int64_t kLatentTile = 2048;

// Tiers of the rank, best last. kNoFloor is below every tier: no bound yet.
constexpr int kNoFloor = -1;
constexpr int kBelowThreshold = 0;
constexpr int kRanked = 1;
constexpr int kNaN = 2;

// A latent's exact rank key, from its canonical pre (value 0 for NaN).
template <typename acc_t>
struct Key {
  int tier;
  acc_t value;
  int64_t latent;
};

template <typename acc_t>
bool ranks_above(const Key<acc_t>& a, const Key<acc_t>& b) {
  if (a.tier != b.tier) return a.tier > b.tier;
  if (a.value != b.value) return a.value > b.value;
  return a.latent < b.latent;
}

// A point of (tier, value) order, to bound keys known only approximately.
template <typename acc_t>
struct Bound {
  int tier;
  acc_t value;
};

template <typename acc_t>
bool below(const Bound<acc_t>& a, const Bound<acc_t>& b) {
  return a.tier != b.tier ? a.tier < b.tier : a.value < b.value;
}

template <typename acc_t>
struct Candidate {
  acc_t screened;
  int64_t latent;
};

template <typename acc_t>
struct RowState {
  acc_t error;         // bound on |screened - canonical| pre; inf: screening rules nothing out
  Bound<acc_t> floor;  // the row's final k-th key is at or above this
  acc_t admit_from;    // a screened pre below this cannot reach the floor (a prefilter)
  int64_t candidates;  // screened in, not yet scored
  int64_t selected;    // scored, in the exact top-k heap
};

// One call's data, and the work on one row of the kRowTile rows in flight
// (row r of the block is row first_row + r of x).
template <typename scalar_t>
struct Selection {
  using acc_t = at::opmath_type<scalar_t>;

  const acc_t* centered;   // [N, d]
  const scalar_t* weight;  // [M, d]
  const acc_t* bias;       // [M]
  const acc_t* threshold;  // [M] or nullptr
  const bool* mask;        // [M] or nullptr
  int64_t d, k, capacity;
  Candidate<acc_t>* candidates;  // [kRowTile, capacity]
  Key<acc_t>* heaps;             // [kRowTile, k]: min-heaps under ranks_above (root = worst kept)
  RowState<acc_t>* rows;         // [kRowTile]
  int64_t first_row = 0;         // of the block in flight

  int tier_of(acc_t pre, int64_t latent) const {
    return threshold != nullptr && !(pre > threshold[latent]) ? kBelowThreshold : kRanked;
  }

  Key<acc_t> canonical_key(int64_t n, int64_t latent) const {
    const acc_t pre = dot(centered + n * d, weight + latent * d, d) + bias[latent];
    if (std::isnan(pre)) return {kNaN, acc_t(0), latent};
    return {tier_of(pre, latent), pre, latent};
  }

  Bound<acc_t> lowest_key(const RowState<acc_t>& row, const Candidate<acc_t>& c) const {
    if (std::isnan(c.screened) || std::isinf(row.error)) return {kNoFloor, -std::numeric_limits<acc_t>::infinity()};
    const acc_t value = c.screened - row.error;
    return {tier_of(value, c.latent), value};
  }

  Bound<acc_t> highest_key(const RowState<acc_t>& row, const Candidate<acc_t>& c) const {
    if (std::isnan(c.screened) || std::isinf(row.error)) return {kNaN, std::numeric_limits<acc_t>::infinity()};
    const acc_t value = c.screened + row.error;
    return {tier_of(value, c.latent), value};
  }

  void raise_floor(RowState<acc_t>& row, const Bound<acc_t>& floor) const {
    if (!below(row.floor, floor)) return;
    row.floor = floor;
    // Only a floor in the top value tier rules latents out by value alone.
    if (floor.tier == kNaN) {
      row.admit_from = std::numeric_limits<acc_t>::infinity();
    } else if (floor.tier == kRanked) {
      const acc_t from = floor.value - row.error;
      // Rounded down, so that the prefilter never rejects a latent whose
      // highest_key still reaches the floor.
      row.admit_from = std::nextafter(from, -std::numeric_limits<acc_t>::infinity());
    }
  }

  void screen_in(int64_t r, int64_t latent, acc_t screened, std::vector<Bound<acc_t>>& scratch) const {
    RowState<acc_t>& row = rows[r];
    const Candidate<acc_t> candidate{screened, latent};
    if (threshold != nullptr && below(highest_key(row, candidate), row.floor)) return;
    Candidate<acc_t>* buffer = candidates + r * capacity;
    buffer[row.candidates++] = candidate;
    if (row.candidates == capacity) make_room(r, scratch);
  }

  // Prunes, then scores the candidates if that freed too little room (many near-ties).
  void make_room(int64_t r, std::vector<Bound<acc_t>>& scratch) const {
    prune(r, scratch);
    if (rows[r].candidates > capacity - capacity / 4) score_candidates(r);
  }

  // Raises the floor to the k-th largest lower bound of the row's keys so far
  // and drops the candidates that cannot reach it.
  void prune(int64_t r, std::vector<Bound<acc_t>>& scratch) const {
    RowState<acc_t>& row = rows[r];
    Candidate<acc_t>* buffer = candidates + r * capacity;
    const Key<acc_t>* heap = heaps + r * k;
    if (row.candidates + row.selected >= k) {
      scratch.clear();
      for (int64_t c = 0; c < row.candidates; ++c) scratch.push_back(lowest_key(row, buffer[c]));
      for (int64_t s = 0; s < row.selected; ++s) scratch.push_back({heap[s].tier, heap[s].value});
      std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                       [](const Bound<acc_t>& a, const Bound<acc_t>& b) { return below(b, a); });
      raise_floor(row, scratch[k - 1]);
    }
    int64_t kept = 0;
    for (int64_t c = 0; c < row.candidates; ++c) {
      if (!below(highest_key(row, buffer[c]), row.floor)) buffer[kept++] = buffer[c];
    }
    row.candidates = kept;
  }

  // Moves every candidate into the exact top-k by its canonical key.
  void score_candidates(int64_t r) const {
    RowState<acc_t>& row = rows[r];
    const Candidate<acc_t>* buffer = candidates + r * capacity;
    Key<acc_t>* heap = heaps + r * k;
    const int64_t n = row_of_x(r);
    for (int64_t c = 0; c < row.candidates; ++c) {
      const Key<acc_t> key = canonical_key(n, buffer[c].latent);
      if (row.selected < k) {
        heap[row.selected++] = key;
        std::push_heap(heap, heap + row.selected, ranks_above<acc_t>);
      } else if (ranks_above(key, heap[0])) {
        std::pop_heap(heap, heap + k, ranks_above<acc_t>);
        heap[k - 1] = key;
        std::push_heap(heap, heap + k, ranks_above<acc_t>);
      }
    }
    row.candidates = 0;
    if (row.selected == k) raise_floor(row, {heap[0].tier, heap[0].value});
  }

  int64_t row_of_x(int64_t r) const { return first_row + r; }
};

// Screens one GEMM tile pre [rows, tile_width] (latents first_latent...) into
// the rows' candidates.
template <typename scalar_t>
void screen_tile(const Selection<scalar_t>& selection, const at::opmath_type<scalar_t>* pre, int64_t rows,
                 int64_t tile_width, int64_t first_latent) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp parallel if (worth_parallel(rows * tile_width))
  {
    std::vector<Bound<acc_t>> scratch;
    scratch.reserve(selection.capacity + selection.k);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* row_pre = pre + r * tile_width;
      acc_t admit_from = selection.rows[r].admit_from;
      for (int64_t c = 0; c < tile_width; ++c) {
        // The hot loop: most latents stop at this one compare (NaN passes it).
        if (row_pre[c] < admit_from) continue;
        const int64_t latent = first_latent + c;
        if (selection.mask != nullptr && !selection.mask[latent]) continue;
        selection.screen_in(r, latent, row_pre[c], scratch);
        admit_from = selection.rows[r].admit_from;
      }
    }
  }
}

// Norm of a row in double: over its finite entries (a weight row), or over
// all of them (an input row: inf or NaN if any entry is).
template <bool kFiniteOnly, typename T>
double row_norm(const T* row, int64_t width) {
  double sum = 0;
  for (int64_t c = 0; c < width; ++c) {
    const double value = static_cast<double>(row[c]);
    if (!kFiniteOnly || std::isfinite(value)) sum += value * value;
  }
  return std::sqrt(sum);
}

// The largest finite-entry norm of the weight's rows and the largest finite |bias|.
template <typename scalar_t, typename acc_t>
std::pair<double, double> weight_and_bias_bounds(const scalar_t* weight, const acc_t* bias, int64_t M, int64_t d) {
  double weight_bound = 0, bias_bound = 0;
#pragma omp parallel for schedule(static) reduction(max : weight_bound, bias_bound) if (worth_parallel(M * d))
  for (int64_t i = 0; i < M; ++i) {
    weight_bound = std::max(weight_bound, row_norm<true>(weight + i * d, d));
    if (std::isfinite(bias[i])) bias_bound = std::max(bias_bound, std::abs(static_cast<double>(bias[i])));
  }
  return {weight_bound, bias_bound};
}

// The selection of topk_encode_cpu, for one input dtype (acc_t-typed copies
// of the centered input, bias and threshold prepared by the caller).
template <typename scalar_t>
void select_topk(const at::Tensor& centered, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mask,
                 const at::Tensor& theta, int64_t k, at::Tensor& values, at::Tensor& indices) {
  const int64_t N = centered.size(0), M = weight.size(0), d = centered.size(1);
  const at::ScalarType acc_type = centered.scalar_type();
  using acc_t = at::opmath_type<scalar_t>;
  constexpr double unit = std::numeric_limits<acc_t>::epsilon() / 2;
  const double terms = static_cast<double>(d + 2);
  double relative = 2 * terms * unit / (1 - terms * unit);
  if (!std::is_same_v<acc_t, double> &&
      at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST) {
    relative += 3 * 0x1p-8;  // the GEMM may round its operands to bfloat16 first
  }
  const double tiny = std::numeric_limits<acc_t>::min();  // underflow, flushed or gradual, per operation
  const double overflow = std::numeric_limits<acc_t>::max() / 4;

  const int64_t block_rows = std::min(N, kRowTile);
  // Room for about k more candidates than a row keeps: each make_room then
  // frees about k slots for its O(capacity) work.
  const int64_t capacity = 2 * k + 64;
  std::vector<Candidate<acc_t>> candidates(block_rows * capacity);
  std::vector<Key<acc_t>> heaps(block_rows * k);
  std::vector<RowState<acc_t>> rows(block_rows);
  at::Tensor pre_buffer = at::empty({block_rows * std::min(M, kLatentTile)}, centered.options());

  Selection<scalar_t> selection{centered.const_data_ptr<acc_t>(),
                                weight.const_data_ptr<scalar_t>(),
                                bias.const_data_ptr<acc_t>(),
                                theta.defined() ? theta.const_data_ptr<acc_t>() : nullptr,
                                mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
                                d,
                                k,
                                capacity,
                                candidates.data(),
                                heaps.data(),
                                rows.data()};
  double weight_bound = 0, bias_bound = 0;
  std::tie(weight_bound, bias_bound) =
      weight_and_bias_bounds(weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<acc_t>(), M, d);

  for (int64_t first_row = 0; first_row < N; first_row += kRowTile) {
    const int64_t block = std::min(kRowTile, N - first_row);
    selection.first_row = first_row;
#pragma omp parallel for schedule(static) if (worth_parallel(block * d))
    for (int64_t r = 0; r < block; ++r) {
      const double norm = row_norm<false>(selection.centered + (first_row + r) * d, d);
      const double scale = norm * weight_bound + bias_bound;
      const double underflow = tiny * (terms + std::sqrt(static_cast<double>(d)) * (weight_bound + norm));
      const double error = scale < overflow ? 2 * (relative * scale + underflow)
                                            : std::numeric_limits<double>::infinity();
      rows[r] = {static_cast<acc_t>(error), {kNoFloor, acc_t(0)}, -std::numeric_limits<acc_t>::infinity(), 0, 0};
      // Rounding the error to acc_t must not shrink it.
      if (static_cast<double>(rows[r].error) < error)
        rows[r].error = std::nextafter(rows[r].error, std::numeric_limits<acc_t>::infinity());
    }
    const at::Tensor block_centered = centered.narrow(0, first_row, block);
    for (int64_t first_latent = 0; first_latent < M; first_latent += kLatentTile) {
      const int64_t tile_width = std::min(kLatentTile, M - first_latent);
      at::Tensor pre = pre_buffer.narrow(0, 0, block * tile_width).view({block, tile_width});
      at::addmm_out(pre, bias.narrow(0, first_latent, tile_width), block_centered,
                    weight.narrow(0, first_latent, tile_width).to(acc_type).t());
      screen_tile(selection, pre.const_data_ptr<acc_t>(), block, tile_width, first_latent);
    }
#pragma omp parallel if (worth_parallel(block * k * (d + 16)))
    {
      std::vector<Bound<acc_t>> scratch;
      scratch.reserve(capacity + k);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < block; ++r) {
        selection.prune(r, scratch);  // each candidate scored costs a read of its weight row
        selection.score_candidates(r);
        Key<acc_t>* heap = heaps.data() + r * k;
        std::sort(heap, heap + k, ranks_above<acc_t>);
        scalar_t* row_values = values.mutable_data_ptr<scalar_t>() + (first_row + r) * k;
        int64_t* row_indices = indices.mutable_data_ptr<int64_t>() + (first_row + r) * k;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t value = heap[j].tier == kNaN ? std::numeric_limits<acc_t>::quiet_NaN()
                                                   : (heap[j].value > 0 ? heap[j].value : acc_t(0));
          row_values[j] = static_cast<scalar_t>(value);
          row_indices[j] = heap[j].latent;
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                   const at::Tensor& b_enc, int64_t k,
                                                   const std::optional<at::Tensor>& pre_bias,
                                                   const std::optional<at::Tensor>& latent_mask,
                                                   const std::optional<at::Tensor>& threshold) {
  check_topk_encode_args(x, W_enc, b_enc, k, pre_bias, latent_mask, threshold);
  const int64_t N = x.size(0);
  at::Tensor values = new_output({N, k}, x.options());
  at::Tensor indices = new_output({N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {values, indices};

  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor centered = (pre_bias.has_value() ? x - *pre_bias : x).to(acc_type).contiguous();
  const at::Tensor weight = W_enc.contiguous();
  const at::Tensor bias = b_enc.to(acc_type).contiguous();
  const at::Tensor mask = latent_mask.has_value() ? latent_mask->contiguous() : at::Tensor();
  const at::Tensor theta = threshold.has_value() ? threshold->to(acc_type).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_encode_cpu", [&] {
    select_topk<scalar_t>(centered, weight, bias, mask, theta, k, values, indices);
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(interpkernels, CPU, m) { m.impl("topk_encode", &topk_encode_cpu); }

}  // namespace interpkernels::cpu
