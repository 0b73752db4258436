"""Where the Triton kernels run in this test session: on the GPU when there
is one, else on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 before anything imports triton)."""

import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
