#pragma once
// When the CPU kernels go parallel. An OpenMP region costs a few microseconds
// on an idle machine and, when other processes hold the cores, far more
// (threads wait at its barriers for ones that are not running): small
// problems, such as a gradcheck's, run on the calling thread alone.
#include <cstdint>

namespace interpkernels::cpu {

// Scalar operations below which a loop runs serially.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

inline bool worth_parallel(int64_t work) { return work >= kMinParallelWork; }

}  // namespace interpkernels::cpu
