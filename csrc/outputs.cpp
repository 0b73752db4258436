#include "outputs.h"

#include <cstdlib>
#include <cstring>
#include <limits>

namespace interpkernels {

namespace {

bool poison_outputs() {
  static const bool poison = [] {
    const char* requested = std::getenv("INTERPKERNELS_POISON_OUTPUTS");
    return requested != nullptr && std::strcmp(requested, "1") == 0;
  }();
  return poison;
}

}  // namespace

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!poison_outputs()) return at::empty(sizes, options);
  if (at::isFloatingType(c10::typeMetaToScalarType(options.dtype()))) {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::full(sizes, std::numeric_limits<int64_t>::min(), options);
}

}  // namespace interpkernels
