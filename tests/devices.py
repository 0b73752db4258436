"""Where the Triton kernels run in this test session: on the GPU when there
is one, else on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 before anything imports triton)."""

import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backends_and_devices():
    """(backend, device) pairs topk_encode runs on here: the C++ kernels on CPU
    (and on CUDA when compiled and a GPU is visible), the dense reference, and
    Triton on TRITON_DEVICE when installed."""
    import interpkernels

    usable = interpkernels.build_info()["backends"]
    pairs = [("cpu", "cpu"), ("torch", "cpu")]
    if "cuda" in usable:
        pairs.append(("cuda", "cuda"))
    if "triton" in usable:
        pairs.append(("triton", TRITON_DEVICE))
    return pairs
