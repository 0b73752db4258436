// CPU kernels of attribution patching (SPEC §4, docs/OPS.md):
//   latent_attribution  per row, the union of the clean and patched supports,
//                       deltas f_p - f_c there and dots W_dec[i] . grad[n]
//   error_attribution   out[n] = (patched_error - clean_error)[n] . grad[n]
//   feature_edges       E[n, i, j] = dst_scale[n, i] * (W_enc_dst[dst[n, i]] . W_dec_src[src[n, j]])
//                                    * src_values[n, j], pruned per destination (n, i)
// Each accumulates in float32 (float64 for float64 inputs) and writes float32
// (float64). Every row (token) is owned by one thread and computed by the
// canonical loops of cpu/vector_math.h, so results depend neither on the
// thread count nor on the instruction set.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "checks.h"
#include "cpu/parallel.h"
#include "cpu/vector_math.h"

namespace interpkernels::cpu {
namespace {

// Row n's slots: the clean entries, then the patched ones.
struct CodePair {
  const int64_t* clean;
  const int64_t* patched;
  int64_t k_clean, k_patched;
  int64_t latent(int64_t slot) const { return slot < k_clean ? clean[slot] : patched[slot - k_clean]; }
};

template <typename scalar_t>
void latent_attribution_rows(const scalar_t* clean_values, const int64_t* clean_indices, const scalar_t* patched_values,
                             const int64_t* patched_indices, const scalar_t* grad, const scalar_t* weight,
                             int64_t* union_indices, at::opmath_type<scalar_t>* deltas,
                             at::opmath_type<scalar_t>* dots, int64_t N, int64_t k_clean, int64_t k_patched,
                             int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t slots = k_clean + k_patched;
  // The O(slots^2) comparisons of a row cost less than its dots while slots <= d.
#pragma omp parallel for schedule(static) if (worth_parallel(N * slots * (d + slots)))
  for (int64_t n = 0; n < N; ++n) {
    const CodePair code{clean_indices + n * k_clean, patched_indices + n * k_patched, k_clean, k_patched};
    const scalar_t* clean_row = clean_values + n * k_clean;
    const scalar_t* patched_row = patched_values + n * k_patched;
    for (int64_t s = 0; s < slots; ++s) {
      const int64_t out = n * slots + s, latent = code.latent(s);
      bool first = true;
      for (int64_t t = 0; t < s && first; ++t) first = code.latent(t) != latent;
      if (!first) {
        union_indices[out] = -1;
        deltas[out] = dots[out] = acc_t(0);
        continue;
      }
      // f at this latent: the sum of the row's entries holding it, in entry order.
      acc_t f_clean = 0, f_patched = 0;
      for (int64_t j = 0; j < k_clean; ++j)
        if (code.clean[j] == latent) f_clean += static_cast<acc_t>(clean_row[j]);
      for (int64_t j = 0; j < k_patched; ++j)
        if (code.patched[j] == latent) f_patched += static_cast<acc_t>(patched_row[j]);
      union_indices[out] = latent;
      deltas[out] = f_patched - f_clean;
      dots[out] = dot(weight + latent * d, grad + n * d, d);
    }
  }
}

template <typename scalar_t>
void error_attribution_rows(const scalar_t* clean_error, const scalar_t* patched_error, const scalar_t* grad,
                            at::opmath_type<scalar_t>* out, int64_t N, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp parallel if (worth_parallel(N * d))
  {
    std::vector<acc_t> difference(d);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < d; ++c)
        difference[c] = static_cast<acc_t>(patched_error[n * d + c]) - static_cast<acc_t>(clean_error[n * d + c]);
      out[n] = dot(difference.data(), grad + n * d, d);
    }
  }
}

struct Pruning {
  int64_t kept;          // slots written per destination: min(top_k, k_src), or k_src
  bool rank;             // top_k given: choose and order by decreasing |E|
  bool has_threshold;
  double threshold;
};

template <typename acc_t>
acc_t rank_key(acc_t edge) {
  return std::isnan(edge) ? std::numeric_limits<acc_t>::infinity() : std::abs(edge);
}

template <typename scalar_t>
void feature_edges_rows(const scalar_t* src_values, const int64_t* src_indices, const scalar_t* W_dec_src,
                        const int64_t* dst_indices, const scalar_t* W_enc_dst, const scalar_t* dst_scale,
                        at::opmath_type<scalar_t>* out_values, int64_t* out_slots, int64_t N, int64_t k_src,
                        int64_t k_dst, int64_t d, const Pruning& pruning) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = pruning.kept;
#pragma omp parallel if (worth_parallel(N * k_dst * k_src * d))
  {
    std::vector<acc_t> edges(k_src), keys(k_src);
    std::vector<int64_t> order(k_src);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t i = 0; i < k_dst; ++i) {
        const scalar_t* encoder_row = W_enc_dst + dst_indices[n * k_dst + i] * d;
        const acc_t scale = static_cast<acc_t>(dst_scale[n * k_dst + i]);
        for (int64_t j = 0; j < k_src; ++j) {
          const acc_t virtual_weight = dot(encoder_row, W_dec_src + src_indices[n * k_src + j] * d, d);
          edges[j] = scale * virtual_weight * static_cast<acc_t>(src_values[n * k_src + j]);
          keys[j] = rank_key(edges[j]);
        }
        std::iota(order.begin(), order.end(), int64_t{0});
        if (pruning.rank) {
          // A strict total order (ties to the lower j), so the result does not depend on the algorithm.
          std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int64_t a, int64_t b) {
            return keys[a] > keys[b] || (keys[a] == keys[b] && a < b);
          });
        }
        acc_t* values_out = out_values + (n * k_dst + i) * K;
        int64_t* slots_out = out_slots + (n * k_dst + i) * K;
        int64_t written = 0;
        for (int64_t r = 0; r < K; ++r) {
          const int64_t j = order[r];
          if (pruning.has_threshold && !(keys[j] >= static_cast<acc_t>(pruning.threshold))) continue;
          values_out[written] = edges[j];
          slots_out[written++] = j;
        }
        for (; written < K; ++written) {
          values_out[written] = acc_t(0);
          slots_out[written] = -1;
        }
      }
    }
  }
}

at::ScalarType score_dtype(const at::Tensor& input) { return at::toOpMathType(input.scalar_type()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> latent_attribution_cpu(const at::Tensor& clean_values,
                                                                      const at::Tensor& clean_indices,
                                                                      const at::Tensor& patched_values,
                                                                      const at::Tensor& patched_indices,
                                                                      const at::Tensor& grad, const at::Tensor& W_dec) {
  check_latent_attribution_args(clean_values, clean_indices, patched_values, patched_indices, grad, W_dec);
  const int64_t N = grad.size(0), d = grad.size(1), k_clean = clean_indices.size(1),
                k_patched = patched_indices.size(1);
  const at::Tensor clean_values_c = clean_values.contiguous(), clean_indices_c = clean_indices.contiguous(),
                   patched_values_c = patched_values.contiguous(), patched_indices_c = patched_indices.contiguous(),
                   grad_c = grad.contiguous(), weight = W_dec.contiguous();
  at::Tensor union_indices = at::empty({N, k_clean + k_patched}, clean_indices.options());
  at::Tensor deltas = at::empty({N, k_clean + k_patched}, grad.options().dtype(score_dtype(grad)));
  at::Tensor dots = at::empty_like(deltas);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "latent_attribution_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    latent_attribution_rows<scalar_t>(clean_values_c.data_ptr<scalar_t>(), clean_indices_c.data_ptr<int64_t>(),
                                      patched_values_c.data_ptr<scalar_t>(), patched_indices_c.data_ptr<int64_t>(),
                                      grad_c.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                      union_indices.data_ptr<int64_t>(), deltas.data_ptr<acc_t>(),
                                      dots.data_ptr<acc_t>(), N, k_clean, k_patched, d);
  });
  return {deltas, dots, union_indices};
}

at::Tensor error_attribution_cpu(const at::Tensor& clean_error, const at::Tensor& patched_error,
                                 const at::Tensor& grad) {
  check_error_attribution_args(clean_error, patched_error, grad);
  const int64_t N = grad.size(0), d = grad.size(1);
  const at::Tensor clean_c = clean_error.contiguous(), patched_c = patched_error.contiguous(),
                   grad_c = grad.contiguous();
  at::Tensor out = at::empty({N}, grad.options().dtype(score_dtype(grad)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "error_attribution_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    error_attribution_rows<scalar_t>(clean_c.data_ptr<scalar_t>(), patched_c.data_ptr<scalar_t>(),
                                     grad_c.data_ptr<scalar_t>(), out.data_ptr<acc_t>(), N, d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> feature_edges_cpu(const at::Tensor& src_values, const at::Tensor& src_indices,
                                                     const at::Tensor& W_dec_src, const at::Tensor& dst_indices,
                                                     const at::Tensor& W_enc_dst, const at::Tensor& dst_scale,
                                                     std::optional<int64_t> top_k, std::optional<double> threshold) {
  check_feature_edges_args(src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale, top_k, threshold);
  const int64_t N = src_values.size(0), k_src = src_values.size(1), k_dst = dst_indices.size(1),
                d = W_dec_src.size(1);
  const Pruning pruning{top_k.has_value() ? std::min(*top_k, k_src) : k_src, top_k.has_value(), threshold.has_value(),
                        threshold.value_or(0.0)};
  const at::Tensor src_values_c = src_values.contiguous(), src_indices_c = src_indices.contiguous(),
                   decoder = W_dec_src.contiguous(), dst_indices_c = dst_indices.contiguous(),
                   encoder = W_enc_dst.contiguous(), dst_scale_c = dst_scale.contiguous();
  at::Tensor values = at::empty({N, k_dst, pruning.kept}, src_values.options().dtype(score_dtype(src_values)));
  at::Tensor slots = at::empty({N, k_dst, pruning.kept}, src_indices.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src_values.scalar_type(), "feature_edges_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    feature_edges_rows<scalar_t>(src_values_c.data_ptr<scalar_t>(), src_indices_c.data_ptr<int64_t>(),
                                 decoder.data_ptr<scalar_t>(), dst_indices_c.data_ptr<int64_t>(),
                                 encoder.data_ptr<scalar_t>(), dst_scale_c.data_ptr<scalar_t>(),
                                 values.data_ptr<acc_t>(), slots.data_ptr<int64_t>(), N, k_src, k_dst, d, pruning);
  });
  return {values, slots};
}

}  // namespace

TORCH_LIBRARY_IMPL(interpkernels, CPU, m) {
  m.impl("latent_attribution", &latent_attribution_cpu);
  m.impl("error_attribution", &error_attribution_cpu);
  m.impl("feature_edges", &feature_edges_cpu);
}

}  // namespace interpkernels::cpu
