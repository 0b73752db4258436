// CPU kernel for APD's component attribution (docs/OPS.md, SPEC section 5):
//   A[n, c] = sum_o (sum_r h[n,c,r] * (B[c,r] . G[n,o]))^2  =  || G[n] w[n,c] ||^2,
//   w[n,c]  = sum_r h[n,c,r] B[c,r]   (rank 1: m = 1, B[c,0] = U[c]).
// h [N, C, m] component activations, B [C, m, d], G [N, O, d] output-Jacobian rows.
// Neither [N, O, C] nor [N, C, d] is ever stored; two ways, chosen per call by
// their multiply-add count per token:
//   projection  P = G[n] @ B_flat^T [O, C*m], tiled over (tokens x outputs)
//               and components; A accumulates sum_o (h . P)^2 tile by tile.
//               O*C*m*d per token.
//   gram        K = G[n]^T G[n] [d, d]; for a tile of components W = h[n] . B
//               [tile, d], A = rowdot(W @ K, W).  O*d^2 + C*d^2 + C*m*d per token.
// The gram way wins when d * (O + C) + C*m*d < O*C*m, i.e. for many outputs
// and components over a narrow layer (O = 4096, C = 8192, d = 512: 3.2x fewer;
// at O = 1024 the two are about even).
//
// Contract. The products go through ATen GEMMs (the BLAS) in float32 (float64
// for float64 inputs); their rounding depends on the BLAS build, on the CPU
// and possibly on its thread count, so bits are not promised across machines:
// float32 results are within 1e-5 (relative to the largest entry) of the
// float64 oracle, which the tests check. Everything after the GEMMs (the
// squares and the sums over o and r) is serial scalar code in a fixed order:
// on one machine, with one BLAS and thread count, a call is deterministic run
// to run. It is 1/d of the GEMMs' work, so it runs on the calling thread: an
// OpenMP region per tile cost more than it saved when other processes held
// the cores (its threads waited at barriers), while the BLAS uses every thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace interpkernels::cpu {
namespace {

// One GEMM tile of at most kRowTile x kColumnTile accumulator entries (8 MiB
// in float32): efficient for the BLAS, small beside [N, O, C].
constexpr int64_t kRowTile = 1024;
constexpr int64_t kColumnTile = 2048;
// Components per reduction task (they stay in cache while o runs).
constexpr int64_t kComponentChunk = 256;

bool gram_is_cheaper(int64_t O, int64_t C, int64_t m, int64_t d) {
  const double projection = static_cast<double>(O) * C * m * d;
  const double gram = static_cast<double>(d) * d * (O + C) + static_cast<double>(C) * m * d;
  return gram < projection;
}

// acc[n, c] += sum_{o < outputs} (sum_r h[n,c,r] * proj[n, o, c*m + r])^2 for the
// tokens [first_token, first_token + tokens) and components [first_c, first_c + comps).
template <typename acc_t>
void accumulate_squares(acc_t* acc, const acc_t* h, const acc_t* proj, int64_t tokens, int64_t outputs,
                        int64_t first_token, int64_t first_c, int64_t comps, int64_t C, int64_t m) {
  const int64_t chunks = (comps + kComponentChunk - 1) / kComponentChunk;
  const int64_t proj_width = comps * m;
  for (int64_t task = 0; task < tokens * chunks; ++task) {
    const int64_t t = task / chunks, c_begin = (task % chunks) * kComponentChunk;
    const int64_t c_end = std::min(comps, c_begin + kComponentChunk);
    const int64_t n = first_token + t;
    acc_t* acc_row = acc + n * C + first_c;
    const acc_t* h_row = h + (n * C + first_c) * m;
    for (int64_t o = 0; o < outputs; ++o) {
      const acc_t* p = proj + (t * outputs + o) * proj_width;
      for (int64_t c = c_begin; c < c_end; ++c) {
        acc_t s = 0;
        for (int64_t r = 0; r < m; ++r) s += h_row[c * m + r] * p[c * m + r];
        acc_row[c] += s * s;
      }
    }
  }
}

template <typename acc_t>
void attribution_by_projection(acc_t* acc, const at::Tensor& h, const at::Tensor& B_flat, const at::Tensor& G,
                               int64_t C, int64_t m) {
  const int64_t N = G.size(0), O = G.size(1), d = G.size(2);
  const at::Tensor G_rows = G.view({N * O, d});
  const int64_t outputs_per_tile = std::min(O, kRowTile);
  const int64_t tokens_per_tile = O >= kRowTile ? 1 : kRowTile / O;
  const int64_t comps_per_tile = std::max<int64_t>(1, kColumnTile / m);
  const acc_t* h_data = h.const_data_ptr<acc_t>();
  for (int64_t first_token = 0; first_token < N; first_token += tokens_per_tile) {
    const int64_t tokens = std::min(tokens_per_tile, N - first_token);
    for (int64_t first_o = 0; first_o < O; first_o += outputs_per_tile) {
      const int64_t outputs = std::min(outputs_per_tile, O - first_o);
      // Rows of G for these tokens and outputs: contiguous when a tile spans whole tokens.
      const at::Tensor rows = tokens == 1 ? G_rows.narrow(0, first_token * O + first_o, outputs)
                                          : G_rows.narrow(0, first_token * O, tokens * O);
      for (int64_t first_c = 0; first_c < C; first_c += comps_per_tile) {
        const int64_t comps = std::min(comps_per_tile, C - first_c);
        const at::Tensor proj = at::mm(rows, B_flat.narrow(0, first_c * m, comps * m).t());
        accumulate_squares(acc, h_data, proj.const_data_ptr<acc_t>(), tokens, outputs, first_token, first_c, comps,
                           C, m);
      }
    }
  }
}

template <typename acc_t>
void attribution_by_gram(acc_t* acc, const at::Tensor& h, const at::Tensor& B, const at::Tensor& G, int64_t C,
                         int64_t m) {
  const int64_t N = G.size(0), d = G.size(2);
  const int64_t comps_per_tile = std::max<int64_t>(1, kRowTile * kColumnTile / (2 * d));
  for (int64_t n = 0; n < N; ++n) {
    const at::Tensor gram = at::mm(G[n].t(), G[n]);  // [d, d]
    for (int64_t first_c = 0; first_c < C; first_c += comps_per_tile) {
      const int64_t comps = std::min(comps_per_tile, C - first_c);
      // w[c] = sum_r h[n,c,r] B[c,r]: [comps, 1, m] @ [comps, m, d].
      const at::Tensor w = at::bmm(h[n].narrow(0, first_c, comps).unsqueeze(1), B.narrow(0, first_c, comps))
                               .view({comps, d});
      const at::Tensor wk = at::mm(w, gram);
      const acc_t* w_data = w.const_data_ptr<acc_t>();
      const acc_t* wk_data = wk.const_data_ptr<acc_t>();
      acc_t* acc_row = acc + n * C + first_c;
      for (int64_t c = 0; c < comps; ++c) {
        acc_t total = 0;
        for (int64_t j = 0; j < d; ++j) total += w_data[c * d + j] * wk_data[c * d + j];
        // ||G w||^2 >= 0 exactly; rounding may dip below 0 when it is tiny.
        acc_row[c] = std::max(total, acc_t(0));
      }
    }
  }
}

at::Tensor component_attribution_cpu(const at::Tensor& h, const at::Tensor& B, const at::Tensor& G) {
  check_component_attribution_args(h, B, G);
  const int64_t N = h.size(0), C = h.size(1), m = h.size(2), O = G.size(1), d = G.size(2);
  const auto acc_type = at::toOpMathType(h.scalar_type());
  at::Tensor acc = at::zeros({N, C}, h.options().dtype(acc_type));
  if (N == 0 || C == 0 || O == 0 || d == 0) return acc.to(h.scalar_type());
  const at::Tensor h_acc = h.to(acc_type).contiguous();
  const at::Tensor B_acc = B.to(acc_type).contiguous();
  const at::Tensor G_acc = G.to(acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "component_attribution_cpu", [&] {
    if (gram_is_cheaper(O, C, m, d)) {
      attribution_by_gram<scalar_t>(acc.data_ptr<scalar_t>(), h_acc, B_acc, G_acc, C, m);
    } else {
      attribution_by_projection<scalar_t>(acc.data_ptr<scalar_t>(), h_acc, B_acc.view({C * m, d}), G_acc, C, m);
    }
  });
  return acc.to(h.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(interpkernels, CPU, m) { m.impl("component_attribution", &component_attribution_cpu); }

}  // namespace interpkernels::cpu
