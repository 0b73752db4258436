"""interpkernels: fused kernels for sparse decomposition in interpretability.

    values, indices = interpkernels.topk_encode(x, W_enc, b_enc, k)
    x_hat = interpkernels.sparse_decode(values, indices, W_dec, b_dec)

Every op is a torch custom op (torch.ops.interpkernels.*) with autograd and a
fake implementation, so it composes with torch.compile(fullgraph=True).
Dense pure-torch versions of each op live in interpkernels.reference.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which the extension links against)

from interpkernels import _C  # noqa: F401  (registers the ops with the dispatcher)
from interpkernels._C import cpu_isa, index_check, set_cpu_isa, set_index_check, supported_cpu_isas
from interpkernels import reference
from interpkernels._backends import triton_usable
from interpkernels._build_info import build_info as _compiled_build_info
from interpkernels.ops import (
    batch_topk_encode,
    component_attribution,
    error_attribution,
    feature_edges,
    jumprelu_encode,
    latent_attribution,
    masked_component_forward,
    multi_target_decode,
    sparse_decode,
    topk_encode,
)

__version__ = "0.1.0"

# A bad INTERPKERNELS_CPU_ISA or INTERPKERNELS_INDEX_CHECK fails the import with a ValueError naming the choices.
cpu_isa()
index_check()


def build_info() -> dict:
    """How this copy was built and what it can run on.

    Keys: version, torch_built_against, torch_running, backends (those usable
    here: "cpu"; "cuda" when CUDA kernels were compiled and a GPU is visible;
    "triton" when triton is installed and a GPU is visible or
    TRITON_INTERPRET=1), cuda_compiled, cuda_archs, openmp_version,
    openmp_max_threads, cpu_isa (the instruction-set level the CPU kernels
    run: INTERPKERNELS_CPU_ISA or set_cpu_isa, else the widest supported) and
    cpu_isas_supported, index_check (interpkernels.set_index_check).
    """
    info = dict(_compiled_build_info())
    info["torch_running"] = torch.__version__
    info["cpu_isa"] = cpu_isa()
    info["cpu_isas_supported"] = supported_cpu_isas()
    info["index_check"] = index_check()
    backends = ["cpu"]
    if info["cuda_compiled"] and torch.cuda.is_available():
        backends.append("cuda")
    if triton_usable(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        backends.append("triton")
    info["backends"] = backends
    return info


__all__ = [
    "batch_topk_encode",
    "build_info",
    "component_attribution",
    "cpu_isa",
    "error_attribution",
    "feature_edges",
    "index_check",
    "jumprelu_encode",
    "latent_attribution",
    "masked_component_forward",
    "multi_target_decode",
    "reference",
    "set_cpu_isa",
    "set_index_check",
    "sparse_decode",
    "supported_cpu_isas",
    "topk_encode",
]
