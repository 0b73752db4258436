// CPU kernels for the sparse-dense products of a sparse code
// (values [N, k], indices [N, k]) with a dense weight [M, d]:
//   sparse_decode            out[n]    = sum_j values[n,j] * W[indices[n,j]] + bias
//   gathered_dot             out[n,j]  = W[indices[n,j]] . dense[n]
//   sparse_transpose_matmul  rows[i]   = sum_{(n,j): indices[n,j]=i} values[n,j] * dense[n]
// Each accumulates in float32 (float64 for float64 inputs) and writes in the
// input dtype. Rows of every output are owned by one thread: no atomics, and
// results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "outputs.h"
#include "cpu/latent_grouping.h"
#include "cpu/parallel.h"
#include "cpu/vector_math.h"

namespace interpkernels::cpu {
namespace {

template <typename scalar_t>
void sparse_decode_rows(const scalar_t* values, const int64_t* indices, const scalar_t* weight, const scalar_t* bias,
                        scalar_t* out, int64_t N, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp parallel if (worth_parallel(N * k * d))
  {
    std::vector<acc_t> acc(d);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < d; ++c) acc[c] = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
      for (int64_t j = 0; j < k; ++j) {
        add_scaled_row(acc.data(), weight + indices[n * k + j] * d, static_cast<acc_t>(values[n * k + j]), d);
      }
      for (int64_t c = 0; c < d; ++c) out[n * d + c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

template <typename scalar_t>
void gathered_dot_rows(const scalar_t* dense, const int64_t* indices, const scalar_t* weight, scalar_t* out, int64_t N,
                       int64_t k, int64_t d) {
#pragma omp parallel for schedule(static) if (worth_parallel(N * k * d))
  for (int64_t n = 0; n < N; ++n) {
    const scalar_t* dense_row = dense + n * d;
    for (int64_t j = 0; j < k; ++j)
      out[n * k + j] = static_cast<scalar_t>(dot(weight + indices[n * k + j] * d, dense_row, d));
  }
}

template <typename scalar_t>
void sparse_transpose_matmul_rows(const scalar_t* values, const scalar_t* dense, const LatentGroups& groups, int64_t k,
                                  int64_t d, int64_t num_latents, scalar_t* rows, scalar_t* value_sums) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp parallel if (worth_parallel((groups.offsets[num_latents] + num_latents) * d))
  {
    std::vector<acc_t> acc(d);
    // Group sizes vary wildly (dead latents are empty): balance dynamically.
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < num_latents; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t value_sum = 0;
      for (int64_t p = groups.offsets[i]; p < groups.offsets[i + 1]; ++p) {
        const int64_t entry = groups.entry_order[p];
        const acc_t v = static_cast<acc_t>(values[entry]);
        value_sum += v;
        add_scaled_row(acc.data(), dense + (entry / k) * d, v, d);
      }
      for (int64_t c = 0; c < d; ++c) rows[i * d + c] = static_cast<scalar_t>(acc[c]);
      value_sums[i] = static_cast<scalar_t>(value_sum);
    }
  }
}

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                             const std::optional<at::Tensor>& bias) {
  check_sparse_decode_args(values, indices, W_dec, bias);
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1);
  const at::Tensor values_c = values.contiguous(), indices_c = indices.contiguous(), weight = W_dec.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = new_output({N, d}, W_dec.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W_dec.scalar_type(), "sparse_decode_cpu", [&] {
    sparse_decode_rows<scalar_t>(values_c.data_ptr<scalar_t>(), indices_c.data_ptr<int64_t>(),
                                 weight.data_ptr<scalar_t>(), bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr,
                                 out.data_ptr<scalar_t>(), N, k, d);
  });
  return out;
}

at::Tensor gathered_dot_cpu(const at::Tensor& dense, const at::Tensor& indices, const at::Tensor& W) {
  check_gathered_dot_args(dense, indices, W);
  const int64_t N = indices.size(0), k = indices.size(1), d = W.size(1);
  const at::Tensor dense_c = dense.contiguous(), indices_c = indices.contiguous(), weight = W.contiguous();
  at::Tensor out = new_output({N, k}, dense.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "gathered_dot_cpu", [&] {
    gathered_dot_rows<scalar_t>(dense_c.data_ptr<scalar_t>(), indices_c.data_ptr<int64_t>(),
                                weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, k, d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_rows(const at::Tensor& values, const at::Tensor& dense,
                                                const at::Tensor& grouping, int64_t num_latents) {
  const int64_t k = values.size(1), d = dense.size(1);
  const at::Tensor values_c = values.contiguous(), dense_c = dense.contiguous();
  at::Tensor rows = new_output({num_latents, d}, dense.options());
  at::Tensor value_sums = new_output({num_latents}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "sparse_transpose_matmul_cpu", [&] {
    sparse_transpose_matmul_rows<scalar_t>(values_c.data_ptr<scalar_t>(), dense_c.data_ptr<scalar_t>(),
                                           latent_groups(grouping, num_latents), k, d, num_latents,
                                           rows.data_ptr<scalar_t>(), value_sums.data_ptr<scalar_t>());
  });
  return {rows, value_sums};
}

std::tuple<at::Tensor, at::Tensor> sparse_transpose_matmul_cpu(const at::Tensor& values, const at::Tensor& indices,
                                                              const at::Tensor& dense, int64_t num_latents) {
  check_sparse_transpose_matmul_args(values, indices, dense, num_latents);
  return grouped_rows(values, dense, group_by_latent(indices, num_latents), num_latents);
}

at::Tensor latent_grouping_cpu(const at::Tensor& indices, int64_t num_latents) {
  check_latent_grouping_args(indices, num_latents);
  return group_by_latent(indices, num_latents);
}

std::tuple<at::Tensor, at::Tensor> grouped_transpose_matmul_cpu(const at::Tensor& values, const at::Tensor& indices,
                                                                const at::Tensor& dense, const at::Tensor& grouping) {
  const int64_t num_latents = check_grouped_transpose_matmul_args(values, indices, dense, grouping);
  return grouped_rows(values, dense, grouping.contiguous(), num_latents);
}

}  // namespace

TORCH_LIBRARY_IMPL(interpkernels, CPU, m) {
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("gathered_dot", &gathered_dot_cpu);
  m.impl("sparse_transpose_matmul", &sparse_transpose_matmul_cpu);
  m.impl("latent_grouping", &latent_grouping_cpu);
  m.impl("grouped_transpose_matmul", &grouped_transpose_matmul_cpu);
}

}  // namespace interpkernels::cpu
