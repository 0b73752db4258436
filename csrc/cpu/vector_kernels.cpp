// One x86-64 level's table of vector_kernels.h. CMake compiles this file once
// per level with -march=<level> -ffp-contract=off and
// INTERPKERNELS_VECTOR_KERNELS=<name of the table function>.
//
// The canonical arithmetic, the same at every level:
//   dot:  lane[l] = sum over c = l, l + kLanes, ... of a[c] * b[c], each
//         product rounded, then added in increasing c (no FMA); then
//         lane[l] += lane[l + h] for h = kLanes/2, ..., 1; the result is lane[0].
//   add_scaled_row: acc[c] = acc[c] + (scale * row[c]), product rounded first.
#include "cpu/vector_kernels.h"

#ifndef INTERPKERNELS_VECTOR_KERNELS
#error "compile with -DINTERPKERNELS_VECTOR_KERNELS=vector_kernels_<level> (see CMakeLists.txt)"
#endif

namespace interpkernels::cpu {
namespace {

// 16 float32 lanes: one AVX-512 register, two AVX2 ones, four SSE ones.
constexpr int kLanes = 16;

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float float_from_bits(uint32_t bits) {
  float value;
  __builtin_memcpy(&value, &bits, sizeof value);
  return value;
}

inline float widen(float value) { return value; }
inline double widen(double value) { return value; }
inline float widen(BFloat16 value) { return float_from_bits(uint32_t{value.bits} << 16); }

// Exact IEEE half -> float, branch-free so that it vectorizes: rebias the
// exponent; infinities and NaNs get the rest of float's exponent range, and
// subnormals (normal in float) are normalized by one exact subtraction.
inline float widen(Half value) {
  const uint32_t magnitude = uint32_t{value.bits & 0x7FFFu} << 13;
  const uint32_t exponent = magnitude & 0x0F800000u;
  const uint32_t rebiased = magnitude + (uint32_t{127 - 15} << 23);
  const uint32_t normal = exponent == 0x0F800000u ? rebiased + (uint32_t{128 - 16} << 23) : rebiased;
  const float subnormal = float_from_bits(rebiased + (1u << 23)) - float_from_bits(uint32_t{113} << 23);
  const float unsigned_value = exponent == 0 ? subnormal : float_from_bits(normal);
  uint32_t bits;
  __builtin_memcpy(&bits, &unsigned_value, sizeof bits);
  return float_from_bits(bits | (uint32_t{value.bits & 0x8000u} << 16));
}

template <typename acc_t, typename A, typename B>
acc_t dot(const A* a, const B* b, int64_t width) {
  acc_t lane[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= width; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] = lane[l] + widen(a[c + l]) * widen(b[c + l]);
  }
  for (int l = 0; c + l < width; ++l) lane[l] = lane[l] + widen(a[c + l]) * widen(b[c + l]);
  for (int half = kLanes / 2; half > 0; half /= 2) {
    for (int l = 0; l < half; ++l) lane[l] = lane[l] + lane[l + half];
  }
  return lane[0];
}

template <typename acc_t, typename scalar_t>
void add_scaled_row(acc_t* acc, const scalar_t* row, acc_t scale, int64_t width) {
  for (int64_t c = 0; c < width; ++c) acc[c] = acc[c] + scale * widen(row[c]);
}

const Half* as_half(const uint16_t* bits) { return reinterpret_cast<const Half*>(bits); }
const BFloat16* as_bfloat16(const uint16_t* bits) { return reinterpret_cast<const BFloat16*>(bits); }

constexpr VectorKernels kTable = {
    [](float* acc, const float* row, float scale, int64_t width) { add_scaled_row(acc, row, scale, width); },
    [](float* acc, const uint16_t* row, float scale, int64_t width) {
      add_scaled_row(acc, as_half(row), scale, width);
    },
    [](float* acc, const uint16_t* row, float scale, int64_t width) {
      add_scaled_row(acc, as_bfloat16(row), scale, width);
    },
    [](double* acc, const double* row, double scale, int64_t width) { add_scaled_row(acc, row, scale, width); },
    [](const float* a, const float* b, int64_t width) { return dot<float>(a, b, width); },
    [](const uint16_t* a, const uint16_t* b, int64_t width) { return dot<float>(as_half(a), as_half(b), width); },
    [](const uint16_t* a, const uint16_t* b, int64_t width) {
      return dot<float>(as_bfloat16(a), as_bfloat16(b), width);
    },
    [](const double* a, const double* b, int64_t width) { return dot<double>(a, b, width); },
    [](const float* a, const uint16_t* b, int64_t width) { return dot<float>(a, as_half(b), width); },
    [](const float* a, const uint16_t* b, int64_t width) { return dot<float>(a, as_bfloat16(b), width); },
};

}  // namespace

const VectorKernels& INTERPKERNELS_VECTOR_KERNELS() { return kTable; }

}  // namespace interpkernels::cpu
