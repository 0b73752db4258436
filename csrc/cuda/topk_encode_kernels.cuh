// CUDA kernel for pass 2 of the two-pass TopK encoder of docs/OPS.md (the large-k
// path), free of torch headers so it compiles with plain nvcc. Pass 1, the
// GEMM that materializes pre [N, M] in float32, is done by the torch glue.
//
// Contract, as for the sparse decode kernels:
//   - pointers address CONTIGUOUS row-major device memory on the current
//     device;
//   - sizes and offsets are int64 (N*M and N*k exceed 2^31 at real sizes);
//   - results are deterministic: the selected set and its order follow from
//     the keys alone (ordered block-wide counts, no order-dependent atomics);
//   - the return value is the launch status (cudaGetLastError after the
//     launch) or the first failing call's error; work is queued on `stream`.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace interpkernels::cuda {

// For every row n of pre [N, M] (float32), over the latents i that
// latent_mask [M] keeps in (every latent when latent_mask is nullptr):
//   indices[n, :] = the k latents of highest rank, in rank order;
//   values[n, j]  = relu(pre[n, indices[n, j]]) rounded to scalar_t (float,
//                   __half or __nv_bfloat16); NaN stays NaN.
// The rank: NaN first (torch.topk's rule); then, when threshold [M] is given,
// latents with pre > threshold[i] before the others; then larger pre; then
// the lower latent. -0 and +0 tie. values, indices [N, k].
// Requires 1 <= k <= min(M, topk_select_max_k()) and M <= 2^31 - 1, else
// returns cudaErrorInvalidValue. Each row must keep at least k latents in; a
// row that keeps fewer gets all of them, then slots with index -1, value 0.
// Cost: up to five reads of each row of pre (four 8-bit digit rounds of a
// radix select, a fifth for the threshold's tier bit, then one pass that
// gathers the selection), then a bitonic sort of k entries in shared memory.
template <typename scalar_t>
cudaError_t launch_topk_select(const float* pre, const bool* latent_mask, const float* threshold, int64_t N,
                               int64_t M, int64_t k, scalar_t* values, int64_t* indices, cudaStream_t stream);

// *max_k = the largest k launch_topk_select accepts on the current device: a
// row's selection is sorted in shared memory as 8-byte entries padded to a
// power of two, so max_k is the largest power of two that fits the per-block
// opt-in shared memory (16384 on sm_80 and sm_90, 8192 on sm_86 and sm_89,
// 4096 on sm_75).
cudaError_t topk_select_max_k(int64_t* max_k);

}  // namespace interpkernels::cuda
