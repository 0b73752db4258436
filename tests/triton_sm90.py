"""Compiles every Triton kernel for Hopper (sm_90), no GPU needed: the fused
encoder's (the launcher's default tiles for every dtype and option, and every
tile shape its autotuner may pick for k up to 256), the component attribution's, the SPD
masked forward's and the attribution-patching ops'. `python tests/triton_sm90.py` (test_triton_compile.py runs it). Not under
TRITON_INTERPRET=1, where @triton.jit makes interpreted functions.

Each encoder configuration must also compile to what Hopper runs fast: 16-bit tiles
multiply with wgmma (`wgmma.mma_async` in the PTX; Triton falls back to mma.sync
silently), and no configuration spills registers (no local-memory store, STL, in the
SASS)."""

import importlib
import itertools
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.disasm import get_sass

# The module, not the function of the same name that the package exports.
encoder = importlib.import_module("interpkernels.triton_kernels.topk_encode")
components = importlib.import_module("interpkernels.triton_kernels.component_attribution")
masked = importlib.import_module("interpkernels.triton_kernels.masked_component_forward")
attribution = importlib.import_module("interpkernels.triton_kernels.attribution")
HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, types: dict, constants: dict, **options):
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=HOPPER, options=options)
    assert compiled.asm["cubin"], "no cubin"
    return compiled


def spill_stores(compiled) -> int:
    """Local-memory stores in the SASS: registers spilled (these kernels hold no local arrays)."""
    return len(re.findall(r"\bSTL\b", get_sass(compiled.asm["cubin"])))


def partial_kernel(dtype: str, has_threshold: bool, has_mask: bool, config: triton.Config, k_pad: int) -> list[str]:
    """Compiles one launch configuration of the partial kernel (triton_kernels/topk_encode.py), prints
    how it multiplies, and returns what keeps it off Hopper's fast path (16-bit without wgmma, spills)."""
    sixteen_bit = dtype != "fp32"
    pointer = f"*{dtype}"
    types = dict(x_ptr=pointer, w_ptr=pointer, b_ptr=pointer, mask_ptr="*u8", threshold_ptr="*fp32",
                 keys_ptr="*i64", N="i32", M="i32", d="i32", k="i32", latents_per_split="i32", stride_xn="i32",
                 stride_xd="i32", stride_wm="i32", stride_wd="i32")
    constants = dict(HAS_MASK=has_mask, HAS_THRESHOLD=has_threshold, DOT_PRECISION="tf32" if sixteen_bit else "ieee",
                     K_PAD=k_pad, INSERT_LIMIT=encoder.INSERT_LIMIT, **config.kwargs)
    compiled = compile_for_hopper(encoder._topk_partial_kernel, types, constants, num_warps=config.num_warps,
                                  num_stages=config.num_stages)
    uses_wgmma = "wgmma.mma_async" in compiled.asm["ptx"]
    spilled = spill_stores(compiled)
    name = (f"_topk_partial_kernel {dtype} K_PAD={k_pad} threshold={has_threshold} mask={has_mask} "
            f"{config.kwargs} warps={config.num_warps}")
    print(f"{name}: {'wgmma' if uses_wgmma else 'no wgmma'}, {spilled} spill stores: sm_90 cubin")
    return ([f"{name}: no wgmma"] if sixteen_bit and not uses_wgmma else []) + (
        [f"{name}: {spilled} register spill stores"] if spilled else [])


def merge_kernel(dtype: str) -> None:
    types = dict(keys_ptr="*i64", values_ptr=f"*{dtype}", indices_ptr="*i64", N="i32", width="i32", k="i32")
    compile_for_hopper(encoder._topk_merge_kernel, types, dict(K_PAD=32, WIDTH_PAD=128, BLOCK_R=32))


def tile_shapes(k_pad: int, sixteen_bit: bool) -> list[triton.Config]:
    """Each tile shape the autotuner may pick, once (its candidates differ otherwise only in stages, which
    leave the registers as they are)."""
    seen, configs = set(), []
    for config in encoder.tuning_configs(k_pad, sixteen_bit):
        shape = tuple(sorted(config.kwargs.items()))
        if shape not in seen:
            seen.add(shape)
            configs.append(config)
    return configs

def component_attribution_kernel(dtype: str) -> None:
    """The launcher's largest blocks (triton_kernels/component_attribution.py)."""
    pointer = f"*{dtype}"
    types = dict(h_ptr=pointer, b_ptr=pointer, g_ptr=pointer, column_start_ptr="*i32", width_ptr="*i32",
                 out_ptr=pointer, C="i32", M="i32", O="i32",
                 **{f"stride_{name}": "i32" for name in ("hn", "hc", "hr", "bc", "br", "bd", "gn", "go", "gd")})
    constants = dict(BLOCK_C=64, BLOCK_O=64, BLOCK_D=64, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    compile_for_hopper(components._component_attribution_kernel, types, constants)


def masked_component_forward_kernel(dtype: str, with_delta: bool) -> None:
    """The launcher's largest tiles (triton_kernels/masked_component_forward.py), the delta
    term (with its row mask and the bias) on, or off with those pointers None as the launcher passes them."""
    pointer = f"*{dtype}"
    optional = ("w_ptr", "delta_mask_ptr", "bias_ptr")
    names = ("xn", "xi", "hn", "hj", "mn", "mj", "uj", "ud", "wd", "wi", "dm", "on", "od")
    types = dict(x_ptr=pointer, h_ptr=pointer, mask_ptr=pointer, u_ptr=pointer, out_ptr=pointer, N="i32", J="i32",
                 d_in="i32", d_out="i32", **{f"stride_{name}": "i32" for name in names},
                 **({name: pointer for name in optional} if with_delta else {}))
    constants = dict(HAS_DELTA=with_delta, HAS_DELTA_MASK=with_delta, HAS_BIAS=with_delta, BLOCK_N=64,
                     BLOCK_D=64, BLOCK_K=32, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                     **({} if with_delta else {name: None for name in optional}))
    compile_for_hopper(masked._masked_component_forward_kernel, types, constants)


# ---- attribution patching: the launchers' configurations at k = 64, per dtype ----


def latent_attribution_kernel(dtype: str) -> None:
    pointer = f"*{dtype}"
    types = dict(clean_values_ptr=pointer, clean_indices_ptr="*i64", patched_values_ptr=pointer,
                 patched_indices_ptr="*i64", grad_ptr=pointer, w_ptr=pointer, union_ptr="*i64", deltas_ptr="*fp32",
                 dots_ptr="*fp32", k_clean="i32", k_patched="i32", d="i32", stride_gn="i32", stride_gd="i32",
                 stride_wm="i32", stride_wd="i32")
    compile_for_hopper(attribution._latent_attribution_kernel, types, dict(BLOCK_C=64, BLOCK_P=64, BLOCK_D=64),
                       num_warps=4)


def error_attribution_kernel(dtype: str) -> None:
    pointer = f"*{dtype}"
    types = dict(clean_ptr=pointer, patched_ptr=pointer, grad_ptr=pointer, out_ptr="*fp32", N="i32", d="i32",
                 **{f"stride_{t}{a}": "i32" for t in "cpg" for a in "nd"})
    compile_for_hopper(attribution._error_attribution_kernel, types, dict(BLOCK_N=16, BLOCK_D=128), num_warps=4)


def feature_edges_kernel(dtype: str, rank: bool, has_threshold: bool) -> None:
    pointer = f"*{dtype}"
    types = dict(src_values_ptr=pointer, src_indices_ptr="*i64", w_dec_ptr=pointer, dst_indices_ptr="*i64",
                 w_enc_ptr=pointer, dst_scale_ptr=pointer, values_ptr="*fp32", slots_ptr="*i64", k_src="i32",
                 k_dst="i32", d="i32", kept="i32", threshold="fp32", stride_dm="i32", stride_dd="i32",
                 stride_em="i32", stride_ed="i32")
    constants = dict(RANK=rank, HAS_THRESHOLD=has_threshold, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                     BLOCK_DST=16, BLOCK_SRC=64, BLOCK_D=64)
    compile_for_hopper(attribution._feature_edges_kernel, types, constants, num_warps=4)


def attribution_kernels() -> int:
    """Compiles and prints each configuration; returns how many (18)."""
    compiled = 0
    for dtype in ("fp32", "bf16", "fp16"):
        latent_attribution_kernel(dtype)
        print(f"_latent_attribution_kernel {dtype}: sm_90 cubin")
        error_attribution_kernel(dtype)
        print(f"_error_attribution_kernel {dtype}: sm_90 cubin")
        for rank, has_threshold in itertools.product((False, True), (False, True)):
            feature_edges_kernel(dtype, rank, has_threshold)
            print(f"_feature_edges_kernel {dtype} rank={rank} threshold={has_threshold}: sm_90 cubin")
        compiled += 6
    return compiled


def main() -> None:
    compiled = 0
    slow = []  # encoder configurations off Hopper's fast path
    for dtype, has_threshold, has_mask in itertools.product(("fp32", "bf16", "fp16"), (False, True), (False, True)):
        default = triton.Config(dict(zip(("BLOCK_N", "BLOCK_M", "BLOCK_D"), encoder._default_tiles(32, dtype != "fp32"))),
                                num_warps=8, num_stages=3)
        slow += partial_kernel(dtype, has_threshold, has_mask, default, 32)
        compiled += 1
    for dtype, k_pad in itertools.product(("fp32", "bf16", "fp16"), (32, 64, 128, 256)):
        for config in tile_shapes(k_pad, dtype != "fp32"):
            slow += partial_kernel(dtype, True, True, config, k_pad)
            compiled += 1
    for dtype in ("fp32", "bf16", "fp16"):
        merge_kernel(dtype)
        print(f"_topk_merge_kernel {dtype}: sm_90 cubin")
        compiled += 1
    for dtype in ("fp32", "bf16", "fp16"):
        component_attribution_kernel(dtype)
        print(f"_component_attribution_kernel {dtype}: sm_90 cubin")
        compiled += 1
    for dtype, with_delta in itertools.product(("fp32", "bf16", "fp16"), (False, True)):
        masked_component_forward_kernel(dtype, with_delta)
        print(f"_masked_component_forward_kernel {dtype} delta={with_delta}: sm_90 cubin")
        compiled += 1
    compiled += attribution_kernels()
    print(f"{compiled} kernels compiled")
    if slow:
        sys.exit("encoder configurations off Hopper's fast path:\n" + "\n".join(slow))


if __name__ == "__main__":
    main()
