#pragma once
// The inner loops of the CPU kernels: a row added into an accumulator and a
// dot product, reading float32 / float16 / bfloat16 / float64 rows and
// accumulating in float32 (float64 for float64). Built once per x86-64 level
// (AVX-512, AVX2+FMA, baseline) and chosen at load time, so one binary runs
// anywhere and uses the widest vectors the machine has.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace interpkernels::cpu {

// acc[c] += scale * row[c] for c < width.
void add_scaled_row(float* acc, const float* row, float scale, int64_t width);
void add_scaled_row(float* acc, const c10::Half* row, float scale, int64_t width);
void add_scaled_row(float* acc, const c10::BFloat16* row, float scale, int64_t width);
void add_scaled_row(double* acc, const double* row, double scale, int64_t width);

// sum_c a[c] * b[c].
float dot(const float* a, const float* b, int64_t width);
float dot(const c10::Half* a, const c10::Half* b, int64_t width);
float dot(const c10::BFloat16* a, const c10::BFloat16* b, int64_t width);
double dot(const double* a, const double* b, int64_t width);

}  // namespace interpkernels::cpu
