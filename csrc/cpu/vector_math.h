#pragma once
// The inner loops of the CPU kernels: a row added into an accumulator and a
// dot product, reading float32 / float16 / bfloat16 / float64 rows and
// accumulating in float32 (float64 for float64). Each call goes to the table
// of one x86-64 level (vector_kernels.h): by default the widest the CPU runs,
// or the one INTERPKERNELS_CPU_ISA names at load time, or set_cpu_isa's.
// Every level returns the same bits.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>
#include <vector>

namespace interpkernels::cpu {

// acc[c] += scale * row[c] for c < width.
void add_scaled_row(float* acc, const float* row, float scale, int64_t width);
void add_scaled_row(float* acc, const c10::Half* row, float scale, int64_t width);
void add_scaled_row(float* acc, const c10::BFloat16* row, float scale, int64_t width);
void add_scaled_row(double* acc, const double* row, double scale, int64_t width);

// sum_c a[c] * b[c] (vector_kernels.cpp gives the exact order).
float dot(const float* a, const float* b, int64_t width);
float dot(const c10::Half* a, const c10::Half* b, int64_t width);
float dot(const c10::BFloat16* a, const c10::BFloat16* b, int64_t width);
double dot(const double* a, const double* b, int64_t width);
float dot(const float* a, const c10::Half* b, int64_t width);
float dot(const float* a, const c10::BFloat16* b, int64_t width);

// The levels: "avx512" (x86-64-v4), "avx2" (x86-64-v3), "baseline".
std::vector<std::string> supported_cpu_isas();  // those this CPU runs, widest first
std::string active_cpu_isa();
// Routes every later call to `isa`'s table; throws std::invalid_argument
// naming the choices if `isa` is unknown or this CPU cannot run it.
void set_cpu_isa(const std::string& isa);

}  // namespace interpkernels::cpu
