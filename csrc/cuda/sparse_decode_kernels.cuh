// CUDA kernels for the sparse decode of docs/OPS.md and its backward, free of torch
// headers so they compile with plain nvcc.
//
// Shared contract of every launcher:
//   - pointers address CONTIGUOUS row-major device memory on the current
//     device; indices are int64 and already checked to lie in [0, M);
//   - sizes and offsets are int64 (N*k and M*d exceed 2^31 at real sizes);
//   - accumulation is float32, results are stored in scalar_t, which is
//     float, __half or __nv_bfloat16;
//   - results are deterministic: every output element is one sequential float
//     reduction in a fixed order, no atomics;
//   - the return value is the launch status (cudaGetLastError after the last
//     launch) or the first failing call's error; work is queued on `stream`.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace interpkernels::cuda {

// out[n, c] = Σ_j values[n, j] · weight[indices[n, j], c] + bias[c]
// values, indices [N, k]; weight [M, d]; bias [d] or nullptr; out [N, d].
template <typename scalar_t>
cudaError_t launch_sparse_decode_forward(const scalar_t* values, const int64_t* indices,
                                         const scalar_t* weight, const scalar_t* bias,
                                         scalar_t* out, int64_t N, int64_t k, int64_t d,
                                         cudaStream_t stream);

// out[n, j] = weight[indices[n, j]] · dense[n]   (SDDMM: grad of values)
// dense [N, d]; indices [N, k]; weight [M, d]; out [N, k].
template <typename scalar_t>
cudaError_t launch_gathered_dot(const scalar_t* dense, const int64_t* indices,
                                const scalar_t* weight, scalar_t* out, int64_t N, int64_t k,
                                int64_t d, cudaStream_t stream);

// Groups the num_entries flat entries of an index array by latent (CSR):
//   entry_order[offsets[i] .. offsets[i+1]) = the flat positions e with
//   indices[e] == i, in increasing e (a stable sort, so the result is
//   deterministic); offsets [num_latents + 1], entry_order [num_entries].
// Two-call protocol: with workspace == nullptr only *workspace_bytes is
// written (always > 0); otherwise *workspace_bytes must hold at least that
// size, and workspace must be 256-byte aligned (cudaMalloc and torch's
// allocator are). Requires num_latents <= 2^32.
cudaError_t launch_group_by_latent(const int64_t* indices, int64_t num_entries,
                                   int64_t num_latents, int64_t* offsets,
                                   int64_t* entry_order, void* workspace,
                                   size_t* workspace_bytes, cudaStream_t stream);

// With the grouping above (built from indices [N, k]), for every latent i:
//   out[i, :]     = Σ_{p ∈ [offsets[i], offsets[i+1])} values[e_p] · dense[e_p / k, :]
//   value_sums[i] = Σ_p values[e_p]                    where e_p = entry_order[p]
// i.e. out = Sᵀ · dense for the sparse S [N, M] (grad of the decoder weight).
// values [N, k] (flat); dense [N, d]; out [num_latents, d]; value_sums
// [num_latents]. Latents without entries get zeros.
template <typename scalar_t>
cudaError_t launch_sparse_transpose_matmul(const scalar_t* values, const scalar_t* dense,
                                           const int64_t* offsets, const int64_t* entry_order,
                                           int64_t k, int64_t d, int64_t num_latents,
                                           scalar_t* out, scalar_t* value_sums,
                                           cudaStream_t stream);

}  // namespace interpkernels::cuda
