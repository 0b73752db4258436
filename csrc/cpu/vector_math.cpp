#include "cpu/vector_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define INTERPKERNELS_CPU_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define INTERPKERNELS_CPU_DISPATCH
#endif

namespace interpkernels::cpu {
namespace {

template <typename acc_t, typename scalar_t>
inline void add_scaled_row_impl(acc_t* acc, const scalar_t* row, acc_t scale, int64_t width) {
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) acc[c] += scale * static_cast<acc_t>(row[c]);
}

template <typename acc_t, typename scalar_t>
inline acc_t dot_impl(const scalar_t* a, const scalar_t* b, int64_t width) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < width; ++c) sum += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return sum;
}

}  // namespace

#define DEFINE_VECTOR_MATH(acc_t, scalar_t)                                                            \
  INTERPKERNELS_CPU_DISPATCH void add_scaled_row(acc_t* acc, const scalar_t* row, acc_t scale,        \
                                                 int64_t width) {                                     \
    add_scaled_row_impl(acc, row, scale, width);                                                      \
  }                                                                                                   \
  INTERPKERNELS_CPU_DISPATCH acc_t dot(const scalar_t* a, const scalar_t* b, int64_t width) {         \
    return dot_impl<acc_t>(a, b, width);                                                              \
  }

DEFINE_VECTOR_MATH(float, float)
DEFINE_VECTOR_MATH(float, c10::Half)
DEFINE_VECTOR_MATH(float, c10::BFloat16)
DEFINE_VECTOR_MATH(double, double)

}  // namespace interpkernels::cpu
