"""Compiles the fused encoder's and the attribution ops' Triton kernels for Hopper (sm_90), no GPU needed:
`python tests/triton_sm90.py` (test_triton_compile.py runs it). Not under
TRITON_INTERPRET=1, where @triton.jit makes interpreted functions."""

import importlib
import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The module, not the function of the same name that the package exports.
encoder = importlib.import_module("interpkernels.triton_kernels.topk_encode")
attribution = importlib.import_module("interpkernels.triton_kernels.attribution")
HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, types: dict, constants: dict, **options):
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=HOPPER, options=options)
    assert compiled.asm["cubin"], "no cubin"


def partial_kernel(dtype: str, has_threshold: bool, has_mask: bool) -> None:
    """The launcher's configurations (triton_kernels/topk_encode.py) for one dtype."""
    sixteen_bit = dtype != "fp32"
    pointer = f"*{dtype}"
    types = dict(x_ptr=pointer, w_ptr=pointer, b_ptr=pointer, pre_bias_ptr=pointer, mask_ptr="*u8",
                 threshold_ptr="*fp32", keys_ptr="*i64", N="i32", M="i32", d="i32", k="i32",
                 latents_per_split="i32", stride_xn="i32", stride_xd="i32", stride_wm="i32", stride_wd="i32")
    constants = dict(HAS_PRE_BIAS=True, HAS_MASK=has_mask, HAS_THRESHOLD=has_threshold,
                     DOT_PRECISION="tf32" if sixteen_bit else "ieee", K_PAD=32,
                     BLOCK_N=64 if sixteen_bit else 32, BLOCK_M=128, BLOCK_D=64 if sixteen_bit else 32)
    compile_for_hopper(encoder._topk_partial_kernel, types, constants, num_warps=8, num_stages=3)


def merge_kernel(dtype: str) -> None:
    types = dict(keys_ptr="*i64", values_ptr=f"*{dtype}", indices_ptr="*i64", N="i32", width="i32", k="i32")
    compile_for_hopper(encoder._topk_merge_kernel, types, dict(K_PAD=32, WIDTH_PAD=128, BLOCK_R=32))


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


def attribution_kernels() -> None:
    for dtype in ("fp32", "bf16", "fp16"):
        latent_attribution_kernel(dtype)
        print(f"_latent_attribution_kernel {dtype}: sm_90 cubin")
        error_attribution_kernel(dtype)
        print(f"_error_attribution_kernel {dtype}: sm_90 cubin")
        for rank, has_threshold in itertools.product((False, True), (False, True)):
            feature_edges_kernel(dtype, rank, has_threshold)
            print(f"_feature_edges_kernel {dtype} rank={rank} threshold={has_threshold}: sm_90 cubin")


def main() -> None:
    for dtype, has_threshold, has_mask in itertools.product(("fp32", "bf16", "fp16"), (False, True), (False, True)):
        partial_kernel(dtype, has_threshold, has_mask)
        print(f"_topk_partial_kernel {dtype} threshold={has_threshold} mask={has_mask}: sm_90 cubin")
    for dtype in ("fp32", "bf16", "fp16"):
        merge_kernel(dtype)
        print(f"_topk_merge_kernel {dtype}: sm_90 cubin")
    attribution_kernels()


if __name__ == "__main__":
    main()
