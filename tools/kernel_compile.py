"""Ahead-of-time compilation of inrfmt's Triton kernels for an NVIDIA GPU, without needing one.

    from kernel_compile import compile_for_target      # with tools/ on sys.path
    kernel = compile_for_target(28, 9, capability=90)   # triton's CompiledKernel: asm["ptx"], asm["cubin"], n_regs

Used by the tests to check on CPU-only machines that every configuration compiles, and by the static
kernel report to read registers, shared memory and SASS.
"""
from __future__ import annotations

import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inrfmt.kernels import siren_decode  # noqa: E402

_TRITON_TYPES = {"int8": "i8", "float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}


def compile_for_target(width, hidden_layers, *, capability=90, hidden_dtype="int8", out_dtype="float32",
                       block_pixels=None, num_warps=None, has_theta=True, fast_sin=True, range_reduce=None,
                       fp16_dot=True, split_width=True, hidden_by_batch=False, float_dtype="float32"):
    """Compile the kernel ahead of time for an NVIDIA GPU of `capability` (e.g. 80, 90) without needing one.

    Returns triton's CompiledKernel (asm["ptx"], asm["cubin"], metadata). Used by the tests to check on
    CPU-only machines that every configuration compiles, and to inspect register use.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    default_pixels, default_warps = siren_decode.default_config(width, split_width)
    meta = siren_decode._constexprs(width, hidden_layers, block_pixels or default_pixels, has_theta, fast_sin,
                       fast_sin if range_reduce is None else range_reduce, fp16_dot, split_width, hidden_by_batch)
    fptr = "*" + _TRITON_TYPES[float_dtype]
    signature = {"idx_ptr": "*i64", "theta_ptr": "*fp32", "out_ptr": "*" + _TRITON_TYPES[out_dtype],
                 "first_w_ptr": fptr, "first_b_ptr": fptr, "hidden_w_ptr": "*" + _TRITON_TYPES[hidden_dtype],
                 "hidden_scale_ptr": "*fp32", "hidden_b_ptr": fptr, "last_w_ptr": fptr, "last_b_ptr": fptr,
                 "num_images": "i32", "out_h": "i32", "out_w": "i32", "tiles_per_image": "i32",
                 "stride_ob": "i32", "stride_oc": "i32", "stride_oh": "i32", "stride_ow": "i32",
                 "first_w0": "fp32", "w0": "fp32", "invalid_value": "fp32"}
    meta["SINE"] = triton.jit(siren_decode._sine)
    signature.update({name: "constexpr" for name in meta})
    source = ASTSource(triton.jit(siren_decode._siren_decode_kernel), signature, constexprs=meta)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps or default_warps})


def compile_expand_for_target(total, *, capability=90, hidden_dtype="int8"):
    """Compile the compact-bank expansion kernel ahead of time for `capability` (see compile_for_target)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = dict(TOTAL=int(total), BLOCK=min(siren_decode.EXPAND_BLOCK, triton.next_power_of_2(total)), INTERPRETED=False,
                ADD=None)
    signature = {"idx_ptr": "*i64", "masks_ptr": "*u8", "offsets_ptr": "*i64",
                 "values_ptr": "*" + _TRITON_TYPES[hidden_dtype], "out_ptr": "*" + _TRITON_TYPES[hidden_dtype],
                 "num_images": "i32", "mask_row_bytes": "i32"}
    signature.update({name: "constexpr" for name in meta})
    source = ASTSource(triton.jit(siren_decode._expand_hidden_kernel), signature, constexprs=meta)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
