#include "cpu/vector_math.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "cpu/vector_kernels.h"

namespace interpkernels::cpu {
namespace {

struct Level {
  const char* name;
  const VectorKernels& (*table)();
  bool (*supported)();
};

bool cpu_has_x86_64_v4() {
#ifdef INTERPKERNELS_X86_64_LEVELS
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v4");
#else
  return false;
#endif
}

bool cpu_has_x86_64_v3() {
#ifdef INTERPKERNELS_X86_64_LEVELS
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v3");
#else
  return false;
#endif
}

bool always() { return true; }

// Widest first. Without x86-64 levels (another architecture) only the
// baseline table is compiled, and the other entries are never supported.
#ifdef INTERPKERNELS_X86_64_LEVELS
constexpr Level kLevels[] = {
    {"avx512", vector_kernels_avx512, cpu_has_x86_64_v4},
    {"avx2", vector_kernels_avx2, cpu_has_x86_64_v3},
    {"baseline", vector_kernels_baseline, always},
};
#else
constexpr Level kLevels[] = {{"baseline", vector_kernels_baseline, always}};
#endif

const Level& find_level(const std::string& isa) {
  std::string choices;
  for (const Level& level : kLevels) {
    if (!level.supported()) continue;
    if (isa == level.name) return level;
    choices += choices.empty() ? level.name : std::string(", ") + level.name;
  }
  throw std::invalid_argument("INTERPKERNELS_CPU_ISA / set_cpu_isa: expected one of the levels this CPU runs (" +
                              choices + "), got '" + isa + "'");
}

const Level& initial_level() {
  const char* requested = std::getenv("INTERPKERNELS_CPU_ISA");
  if (requested != nullptr && *requested != '\0') return find_level(requested);
  for (const Level& level : kLevels)
    if (level.supported()) return level;
  return kLevels[sizeof(kLevels) / sizeof(kLevels[0]) - 1];
}

// Chosen on first use, so that a bad INTERPKERNELS_CPU_ISA raises from the
// first call (interpkernels' import makes it) instead of failing the load.
std::atomic<const Level*> active_level{nullptr};

const Level& current_level() {
  const Level* level = active_level.load(std::memory_order_acquire);
  if (level == nullptr) {
    level = &initial_level();
    active_level.store(level, std::memory_order_release);
  }
  return *level;
}

const VectorKernels& kernels() { return current_level().table(); }

const uint16_t* bits(const c10::Half* values) { return reinterpret_cast<const uint16_t*>(values); }
const uint16_t* bits(const c10::BFloat16* values) { return reinterpret_cast<const uint16_t*>(values); }

}  // namespace

void add_scaled_row(float* acc, const float* row, float scale, int64_t width) {
  kernels().add_scaled_row_f32(acc, row, scale, width);
}
void add_scaled_row(float* acc, const c10::Half* row, float scale, int64_t width) {
  kernels().add_scaled_row_f16(acc, bits(row), scale, width);
}
void add_scaled_row(float* acc, const c10::BFloat16* row, float scale, int64_t width) {
  kernels().add_scaled_row_bf16(acc, bits(row), scale, width);
}
void add_scaled_row(double* acc, const double* row, double scale, int64_t width) {
  kernels().add_scaled_row_f64(acc, row, scale, width);
}

float dot(const float* a, const float* b, int64_t width) { return kernels().dot_f32(a, b, width); }
float dot(const c10::Half* a, const c10::Half* b, int64_t width) { return kernels().dot_f16(bits(a), bits(b), width); }
float dot(const c10::BFloat16* a, const c10::BFloat16* b, int64_t width) {
  return kernels().dot_bf16(bits(a), bits(b), width);
}
double dot(const double* a, const double* b, int64_t width) { return kernels().dot_f64(a, b, width); }
float dot(const float* a, const c10::Half* b, int64_t width) { return kernels().dot_f32_f16(a, bits(b), width); }
float dot(const float* a, const c10::BFloat16* b, int64_t width) {
  return kernels().dot_f32_bf16(a, bits(b), width);
}

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> names;
  for (const Level& level : kLevels)
    if (level.supported()) names.emplace_back(level.name);
  return names;
}

std::string active_cpu_isa() { return current_level().name; }

void set_cpu_isa(const std::string& isa) { active_level.store(&find_level(isa), std::memory_order_release); }

}  // namespace interpkernels::cpu
