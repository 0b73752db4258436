// Facts about how this copy of interpkernels was built. Deliberately
// torch-free: torch bundles its own pybind11, and a module that never touches
// torch types cannot disagree with it.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = INTERPKERNELS_VERSION;
  info["torch_built_against"] = INTERPKERNELS_TORCH_VERSION;
  const std::string archs = INTERPKERNELS_CUDA_ARCHS;
  info["cuda_compiled"] = !archs.empty();
  info["cuda_archs"] = archs;
  info["openmp_version"] = _OPENMP;
  // torch's libgomp is loaded first (interpkernels imports torch), so this
  // follows torch.set_num_threads.
  info["openmp_max_threads"] = omp_get_max_threads();
  return info;
}

}  // namespace

PYBIND11_MODULE(_build_info, m) {
  m.doc() = "Build facts of the interpkernels extension";
  m.def("build_info", &build_info, "Version, torch built against, CUDA archs and OpenMP facts of this build");
}
