import torch

import interpkernels


def test_build_info_reports_this_build():
    info = interpkernels.build_info()
    assert info["version"] == interpkernels.__version__
    assert info["torch_built_against"] == torch.__version__ == info["torch_running"]
    assert "cpu" in info["backends"]
    assert info["cuda_compiled"] == bool(info["cuda_archs"])
    if torch.version.cuda is None:  # a CPU torch cannot compile the CUDA glue
        assert not info["cuda_compiled"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert interpkernels.build_info()["openmp_max_threads"] == 1
    finally:
        torch.set_num_threads(threads)


def test_every_op_is_registered_with_a_cpu_kernel():
    for name in ("topk_encode", "sparse_decode", "gathered_dot", "sparse_transpose_matmul"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"interpkernels::{name}", "CPU"), name
