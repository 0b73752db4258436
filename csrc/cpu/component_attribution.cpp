// CPU kernel for APD's component attribution (docs/OPS.md, SPEC section 5), over
// the decomposed layers l, whose contributions add before the square (a component
// spans every layer, as in APD's calc_grad_attributions):
//   A[n, c] = sum_o (sum_l sum_r h_l[n,c,r] * (B_l[c,r] . G_l[n,o]))^2  =  || G[n] w[n,c] ||^2,
//   w_l[n,c] = sum_r h_l[n,c,r] B_l[c,r],  G[n] = [G_1[n] | G_2[n] | ...] [O, D],
//   w[n,c] = [w_1[n,c] | w_2[n,c] | ...] [D],  D = sum_l d_l  (rank 1: m_l = 1, B_l[c,0] = U_l[c]).
// Per layer h_l [N, C, m_l] component activations, B_l [C, m_l, d_l], G_l [N, O, d_l]
// output-Jacobian rows. Neither [N, O, C] nor [N, C, d] is ever stored; two ways,
// chosen per call by their multiply-add count per token (S = sum_l m_l d_l):
//   projection  P_l = G_l[n] @ B_l_flat^T [O, C*m_l], tiled over (tokens x outputs)
//               and components; each tile sums its layers' h_l . P_l into a tile of
//               s, and A accumulates sum_o s^2 tile by tile.  O*C*S per token.
//   gram        K = G[n]^T G[n] [D, D]; for a tile of components W = [w_l] [tile, D],
//               A = rowdot(W @ K, W).  O*D^2 + C*D^2 + C*S per token.
// The gram way wins when D * (O + C) * D + C*S < O*C*S, i.e. for many outputs
// and components over narrow layers (one layer, O = 4096, C = 8192, d = 512:
// 3.2x fewer; at O = 1024 the two are about even).
//
// Contract. The products go through ATen GEMMs (the BLAS) in float32 (float64
// for float64 inputs); their rounding depends on the BLAS build, on the CPU
// and possibly on its thread count, so bits are not promised across machines:
// float32 results are within 1e-5 (relative to the largest entry) of the
// float64 oracle, which the tests check. Everything after the GEMMs (the
// squares and the sums over l, o and r) is serial scalar code in a fixed order:
// on one machine, with one BLAS and thread count, a call is deterministic run
// to run. It is 1/d of the GEMMs' work, so it runs on the calling thread: an
// OpenMP region per tile cost more than it saved when other processes held
// the cores (its threads waited at barriers), while the BLAS uses every thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "checks.h"

namespace interpkernels::cpu {
namespace {

// One GEMM tile of at most kRowTile x kColumnTile accumulator entries (8 MiB
// in float32): efficient for the BLAS, small beside [N, O, C].
constexpr int64_t kRowTile = 1024;
constexpr int64_t kColumnTile = 2048;
// Components per reduction task (they stay in cache while o runs).
constexpr int64_t kComponentChunk = 256;

// One decomposed layer, contiguous in the accumulation type: h [N, C, m], B [C, m, d], G [N, O, d].
struct Layer {
  at::Tensor h, B, G;
  int64_t m, d;
};

// (sum_l m_l d_l, sum_l d_l): the multiply-adds of one projection of every layer, and the width of G[n].
std::pair<int64_t, int64_t> layer_sizes(const std::vector<Layer>& layers) {
  int64_t rank_width = 0, width = 0;
  for (const Layer& layer : layers) {
    rank_width += layer.m * layer.d;
    width += layer.d;
  }
  return {rank_width, width};
}

bool gram_is_cheaper(int64_t O, int64_t C, const std::vector<Layer>& layers) {
  const auto [rank_width, width] = layer_sizes(layers);
  const double projection = static_cast<double>(O) * C * rank_width;
  const double gram = static_cast<double>(width) * width * (O + C) + static_cast<double>(C) * rank_width;
  return gram < projection;
}

// Adds one layer's terms to the sums s of a tile, for the tokens [first_token, first_token + tokens),
// outputs of the tile and components [first_c, first_c + comps):
//   s[t, o, c] = earlier layers' s (0 for the first layer) + sum_r h[n,c,r] * proj[t, o, c*m + r].
// The last layer squares s into acc[n, c] instead of storing it, so one layer never touches s.
template <typename acc_t>
void add_layer_terms(acc_t* sums, bool first_layer, acc_t* acc, const acc_t* h, const acc_t* proj, int64_t tokens,
                     int64_t outputs, int64_t first_token, int64_t first_c, int64_t comps, int64_t C, int64_t m) {
  const int64_t chunks = (comps + kComponentChunk - 1) / kComponentChunk;
  const int64_t proj_width = comps * m;
  for (int64_t task = 0; task < tokens * chunks; ++task) {
    const int64_t t = task / chunks, c_begin = (task % chunks) * kComponentChunk;
    const int64_t c_end = std::min(comps, c_begin + kComponentChunk);
    const int64_t n = first_token + t;
    const acc_t* h_row = h + (n * C + first_c) * m;
    for (int64_t o = 0; o < outputs; ++o) {
      const acc_t* p = proj + (t * outputs + o) * proj_width;
      acc_t* s_row = sums + (t * outputs + o) * comps;
      for (int64_t c = c_begin; c < c_end; ++c) {
        acc_t s = first_layer ? acc_t(0) : s_row[c];
        for (int64_t r = 0; r < m; ++r) s += h_row[c * m + r] * p[c * m + r];
        if (acc != nullptr) {
          acc[n * C + first_c + c] += s * s;
        } else {
          s_row[c] = s;
        }
      }
    }
  }
}

template <typename acc_t>
void attribution_by_projection(acc_t* acc, const std::vector<Layer>& layers, int64_t N, int64_t O, int64_t C) {
  int64_t max_rank = 1;
  for (const Layer& layer : layers) max_rank = std::max(max_rank, layer.m);
  const int64_t outputs_per_tile = std::min(O, kRowTile);
  const int64_t tokens_per_tile = O >= kRowTile ? 1 : kRowTile / O;
  const int64_t comps_per_tile = std::max<int64_t>(1, kColumnTile / max_rank);
  // The sums s of one tile over the layers but the last: [tokens x outputs, components].
  std::vector<acc_t> sums(layers.size() > 1 ? tokens_per_tile * outputs_per_tile * comps_per_tile : 0);
  for (int64_t first_token = 0; first_token < N; first_token += tokens_per_tile) {
    const int64_t tokens = std::min(tokens_per_tile, N - first_token);
    for (int64_t first_o = 0; first_o < O; first_o += outputs_per_tile) {
      const int64_t outputs = std::min(outputs_per_tile, O - first_o);
      for (int64_t first_c = 0; first_c < C; first_c += comps_per_tile) {
        const int64_t comps = std::min(comps_per_tile, C - first_c);
        for (size_t l = 0; l < layers.size(); ++l) {
          const Layer& layer = layers[l];
          const at::Tensor G_rows = layer.G.view({N * O, layer.d});
          // Rows of G for these tokens and outputs: contiguous when a tile spans whole tokens.
          const at::Tensor rows = tokens == 1 ? G_rows.narrow(0, first_token * O + first_o, outputs)
                                              : G_rows.narrow(0, first_token * O, tokens * O);
          const at::Tensor B_flat = layer.B.view({C * layer.m, layer.d});
          const at::Tensor proj = at::mm(rows, B_flat.narrow(0, first_c * layer.m, comps * layer.m).t());
          const bool last_layer = l + 1 == layers.size();
          add_layer_terms(sums.data(), l == 0, last_layer ? acc : nullptr, layer.h.const_data_ptr<acc_t>(),
                          proj.const_data_ptr<acc_t>(), tokens, outputs, first_token, first_c, comps, C, layer.m);
        }
      }
    }
  }
}

template <typename acc_t>
void attribution_by_gram(acc_t* acc, const std::vector<Layer>& layers, int64_t N, int64_t C) {
  const int64_t width = layer_sizes(layers).second;
  const int64_t comps_per_tile = std::max<int64_t>(1, kRowTile * kColumnTile / (2 * width));
  std::vector<at::Tensor> G_parts(layers.size()), w_parts(layers.size());
  for (int64_t n = 0; n < N; ++n) {
    for (size_t l = 0; l < layers.size(); ++l) G_parts[l] = layers[l].G[n];
    const at::Tensor G_n = layers.size() == 1 ? G_parts[0] : at::cat(G_parts, 1);  // [O, D]
    const at::Tensor gram = at::mm(G_n.t(), G_n);                                   // [D, D]
    for (int64_t first_c = 0; first_c < C; first_c += comps_per_tile) {
      const int64_t comps = std::min(comps_per_tile, C - first_c);
      // w_l[c] = sum_r h_l[n,c,r] B_l[c,r]: [comps, 1, m_l] @ [comps, m_l, d_l].
      for (size_t l = 0; l < layers.size(); ++l) {
        const Layer& layer = layers[l];
        w_parts[l] = at::bmm(layer.h[n].narrow(0, first_c, comps).unsqueeze(1), layer.B.narrow(0, first_c, comps))
                         .view({comps, layer.d});
      }
      const at::Tensor w = layers.size() == 1 ? w_parts[0] : at::cat(w_parts, 1);  // [comps, D]
      const at::Tensor wk = at::mm(w, gram);
      const acc_t* w_data = w.const_data_ptr<acc_t>();
      const acc_t* wk_data = wk.const_data_ptr<acc_t>();
      acc_t* acc_row = acc + n * C + first_c;
      for (int64_t c = 0; c < comps; ++c) {
        acc_t total = 0;
        for (int64_t j = 0; j < width; ++j) total += w_data[c * width + j] * wk_data[c * width + j];
        // ||G w||^2 >= 0 exactly; rounding may dip below 0 when it is tiny.
        acc_row[c] = std::max(total, acc_t(0));
      }
    }
  }
}

at::Tensor component_attribution_cpu(at::TensorList h, at::TensorList B, at::TensorList G) {
  check_component_attribution_args(h, B, G);
  const int64_t N = h[0].size(0), C = h[0].size(1), O = G[0].size(1);
  const auto acc_type = at::toOpMathType(h[0].scalar_type());
  at::Tensor acc = at::zeros({N, C}, h[0].options().dtype(acc_type));
  std::vector<Layer> layers;
  for (size_t l = 0; l < h.size(); ++l) {
    // A layer of width 0 adds nothing to any sum.
    if (G[l].size(2) == 0) continue;
    layers.push_back({h[l].to(acc_type).contiguous(), B[l].to(acc_type).contiguous(), G[l].to(acc_type).contiguous(),
                      h[l].size(2), G[l].size(2)});
  }
  if (N == 0 || C == 0 || O == 0 || layers.empty()) return acc.to(h[0].scalar_type());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "component_attribution_cpu", [&] {
    if (gram_is_cheaper(O, C, layers)) {
      attribution_by_gram<scalar_t>(acc.data_ptr<scalar_t>(), layers, N, C);
    } else {
      attribution_by_projection<scalar_t>(acc.data_ptr<scalar_t>(), layers, N, O, C);
    }
  });
  return acc.to(h[0].scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(interpkernels, CPU, m) { m.impl("component_attribution", &component_attribution_cpu); }

}  // namespace interpkernels::cpu
