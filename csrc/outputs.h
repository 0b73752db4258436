#pragma once
// Allocation of every op's outputs, for the kernels of every device.
#include <ATen/ATen.h>

namespace interpkernels {

// An output the kernel will overwrite: uninitialised memory, or, when
// INTERPKERNELS_POISON_OUTPUTS=1 (the test suite sets it), filled with NaN
// (floating types) or the lowest int64, so an element a kernel fails to write
// fails a test instead of passing on whatever the allocator returned.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace interpkernels
