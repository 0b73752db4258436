#pragma once
// The CPU inner loops, one table per x86-64 level. vector_kernels.cpp is
// compiled once per level (AVX-512, AVX2, baseline: x86-64-v4, v3, v1) into
// the table of that level; vector_math.cpp picks one at load time.
//
// Every table computes bit-identical results: the loops are written as fixed
// scalar arithmetic (kLanes independent partial sums, then a fixed pairwise
// tree, no FMA contraction) that each level only vectorizes, so what a kernel
// returns never depends on the CPU it runs on or the level chosen.
//
// This header and vector_kernels.cpp include nothing that defines functions
// (no c10, no std algorithms): an inline function compiled for AVX-512 in one
// level's object could otherwise be the one copy the linker keeps for all.
// 16-bit floats travel as their bit patterns (uint16_t).
#include <cstdint>

namespace interpkernels::cpu {

struct VectorKernels {
  // acc[c] += scale * row[c], c < width.
  void (*add_scaled_row_f32)(float* acc, const float* row, float scale, int64_t width);
  void (*add_scaled_row_f16)(float* acc, const uint16_t* row, float scale, int64_t width);
  void (*add_scaled_row_bf16)(float* acc, const uint16_t* row, float scale, int64_t width);
  void (*add_scaled_row_f64)(double* acc, const double* row, double scale, int64_t width);
  // sum_c a[c] * b[c], both widened to the accumulator type first.
  float (*dot_f32)(const float* a, const float* b, int64_t width);
  float (*dot_f16)(const uint16_t* a, const uint16_t* b, int64_t width);
  float (*dot_bf16)(const uint16_t* a, const uint16_t* b, int64_t width);
  double (*dot_f64)(const double* a, const double* b, int64_t width);
  float (*dot_f32_f16)(const float* a, const uint16_t* b, int64_t width);
  float (*dot_f32_bf16)(const float* a, const uint16_t* b, int64_t width);
};

const VectorKernels& vector_kernels_avx512();
const VectorKernels& vector_kernels_avx2();
const VectorKernels& vector_kernels_baseline();

}  // namespace interpkernels::cpu
