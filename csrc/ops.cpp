// Every op's schema, in one place. Optional arguments carry no defaults: the
// dispatcher drops arguments equal to their defaults, which would change how
// many gradients each backward returns. Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/*_cuda.cpp; fake implementations and autograd
// are registered from Python (interpkernels/ops.py).
//
// Shapes are those the Python wrappers pass after validating and flattening
// leading dimensions: N rows, k active latents per row, M latents, d width.
#include <torch/library.h>

TORCH_LIBRARY(interpkernels, m) {
  // values [N, k] = relu of the k highest-ranked pre = (x - pre_bias) @ W_enc^T
  // + b_enc per row, indices [N, k] int64; latent_mask [M] bool restricts the
  // competition. Rank: NaN first, then (with threshold [M]) latents with
  // pre > threshold, then by decreasing pre, ties to the lower latent.
  m.def("topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, int k, Tensor? pre_bias, "
        "Tensor? latent_mask, Tensor? threshold) -> (Tensor values, Tensor indices)");
  // out [N, d] = sum_j values[n, j] * W_dec[indices[n, j]] + bias.
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor? bias) -> Tensor");
  // out [N, k] = W[indices[n, j]] . dense[n]: the gradient of sparse_decode's values.
  m.def("gathered_dot(Tensor dense, Tensor indices, Tensor W) -> Tensor");
  // (rows [M, d], value_sums [M]): rows[i] = sum over entries (n, j) with
  // indices[n, j] == i of values[n, j] * dense[n], value_sums[i] the sum of
  // those values. The gradient of a weight gathered by indices.
  m.def("sparse_transpose_matmul(Tensor values, Tensor indices, Tensor dense, int num_latents) "
        "-> (Tensor rows, Tensor value_sums)");
  // The entries of a code grouped by latent, int64 [num_latents + 1 + N*k]:
  // offsets [num_latents + 1], then the flat positions n*k + j of latent i's
  // entries in increasing order at [num_latents + 1 + offsets[i], ... + offsets[i+1]).
  // What sparse_transpose_matmul builds first; built once, it serves every
  // product of one code (the decoder's and the encoder's weight gradients).
  m.def("latent_grouping(Tensor indices, int num_latents) -> Tensor");
  // sparse_transpose_matmul with the grouping of `indices` given
  // (num_latents = grouping.numel() - 1 - N*k).
  m.def("grouped_transpose_matmul(Tensor values, Tensor indices, Tensor dense, Tensor grouping) "
        "-> (Tensor rows, Tensor value_sums)");
  // SAE training helpers (in place on contiguous [M, d] rows):
  // grad[i] -= (grad[i] . weight[i]) weight[i] / ||weight[i]||^2, and weight[i] /= ||weight[i]||.
  m.def("remove_parallel_component_(Tensor(a!) grad, Tensor weight) -> ()");
  m.def("normalize_rows_(Tensor(a!) weight) -> ()");
  // (fvu, total_variance), 0-d float32 (float64 for float64 inputs):
  // fvu = sum ||out - y||^2 / total_variance, total_variance = sum ||y - mean(y)||^2 over rows.
  m.def("fvu(Tensor reconstruction, Tensor target) -> (Tensor fvu, Tensor total_variance)");

  // ---- Parameter decomposition (APD / SPD), SPEC section 5 ----
  // out [N, C] = sum_o (sum_l sum_r h_l[n,c,r] * (B_l[c,r] . G_l[n,o]))^2 over the
  // layers l of the lists, each with component activations h_l [N, C, m_l],
  // components B_l [C, m_l, d_l] and output-Jacobian rows G_l [N, O, d_l]: a
  // component spans every layer, so its layers add before the square (APD).
  // Rank 1 is m_l = 1; one layer is a list of one.
  m.def("component_attribution(Tensor[] h, Tensor[] B, Tensor[] G) -> Tensor");
  // out [N, d_out] = (h * mask) @ U + delta_mask[:, None] * (x @ W_delta^T) + bias for
  // x [N, d_in], h and mask [N, C], U [C, d_out], W_delta [d_out, d_in], delta_mask [N]:
  // SPD's masked forward (delta_mask without W_delta is refused).
  m.def("masked_component_forward(Tensor x, Tensor h, Tensor mask, Tensor U, Tensor? W_delta, "
        "Tensor? delta_mask, Tensor? bias) -> Tensor");

  // ---- Attribution patching (SPEC §4; ops/latent_attribution.py and siblings) ----
  // Per row n, the slots s < k_c + k_p of the clean entries then the patched
  // ones: union_indices[n, s] = that entry's latent where s is the first slot
  // holding it, else -1 (a latent in both supports is kept once);
  // deltas[n, s] = f_p - f_c at that latent (sums over the row's entries);
  // dots[n, s] = W_dec[latent] . grad[n]; both 0 at -1 slots. Scores are
  // deltas * dots. Outputs float32 (float64 for float64 inputs).
  m.def("latent_attribution(Tensor clean_values, Tensor clean_indices, Tensor patched_values, "
        "Tensor patched_indices, Tensor grad, Tensor W_dec) -> (Tensor deltas, Tensor dots, Tensor union_indices)");
  // out [N] = (patched_error - clean_error)[n] . grad[n], float32 (float64 for float64).
  m.def("error_attribution(Tensor clean_error, Tensor patched_error, Tensor grad) -> Tensor");
  // E[n, i, j] = dst_scale[n, i] * (W_enc_dst[dst_indices[n, i]] . W_dec_src[src_indices[n, j]]) * src_values[n, j]
  // pruned per destination (n, i): the top_k largest |E| (NaN as +inf, ties to
  // lower j), of those |E| >= threshold. (values, src_slots) [N, k_dst, K],
  // K = min(top_k, k_src) (k_src without top_k): the survivors first, by
  // decreasing |E| with top_k, by increasing j without; then src_slot -1, value 0.
  m.def("feature_edges(Tensor src_values, Tensor src_indices, Tensor W_dec_src, Tensor dst_indices, "
        "Tensor W_enc_dst, Tensor dst_scale, int? top_k, float? threshold) -> (Tensor values, Tensor src_slots)");
}
