"""Ahead-of-time compilation of inrfmt's Triton kernels for an NVIDIA GPU, without needing one.

    from kernel_compile import compile_for_target      # with tools/ on sys.path
    kernel = compile_for_target(28, 9, capability=90)   # triton's CompiledKernel: asm["ptx"], asm["cubin"]

Used by the tests to check on CPU-only machines that every configuration compiles, and by the static
kernel report (tools/kernel_report.py) to read registers, shared memory and SASS. Compiles with the same
configuration as decode_triton (siren_decode.kernel_config) and triton's bundled ptxas.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inrfmt.kernels import siren_decode  # noqa: E402

_TRITON_TYPES = {"int8": "i8", "float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}


def decode_signature(hidden_dtype="int8", out_dtype="float32", float_dtype="float32") -> dict:
    """Triton's type string for each runtime argument of the decode kernel, for these bank/out dtypes."""
    fptr = "*" + _TRITON_TYPES[float_dtype]
    pointers = {"idx_ptr": "*i64", "theta_ptr": "*fp32", "out_ptr": "*" + _TRITON_TYPES[out_dtype],
                "first_w_ptr": fptr, "first_b_ptr": fptr, "hidden_w_ptr": "*" + _TRITON_TYPES[hidden_dtype],
                "hidden_scale_ptr": "*fp32", "hidden_b_ptr": fptr, "last_w_ptr": fptr, "last_b_ptr": fptr}
    params = inspect.signature(siren_decode._siren_decode_kernel).parameters
    signature = {}
    for name, param in params.items():
        if param.annotation is not inspect.Parameter.empty:  # constexpr
            continue
        signature[name] = pointers.get(name) or ("i32" if name in siren_decode.DECODE_RUNTIME_INTS else "fp32")
    return signature


def compile_for_target(width, hidden_layers, *, capability=90, hidden_dtype="int8", out_dtype="float32",
                       float_dtype="float32", config: siren_decode.KernelConfig | None = None, **options):
    """Compile the decode kernel ahead of time for an NVIDIA GPU of `capability` (e.g. 80, 90).

    `options` are siren_decode.kernel_config's (has_theta, fast_sin, range_reduce, fp16_dot, hidden_by_batch,
    block_pixels, num_warps), or pass a `config`. Returns triton's CompiledKernel (asm["ptx"], asm["cubin"],
    metadata)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = config or siren_decode.kernel_config(width, hidden_layers, **options)
    constexprs = dict(config.constexprs, SINE=triton.jit(siren_decode._sine),
                      STAGE=triton.jit(siren_decode._stage_hidden_layer))
    signature = decode_signature(hidden_dtype, out_dtype, float_dtype)
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(triton.jit(siren_decode._siren_decode_kernel), signature, constexprs=constexprs)
    launch = {"num_warps": config.num_warps}
    if config.maxnreg is not None:
        launch["maxnreg"] = config.maxnreg
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=launch)


class _StandInLauncher:
    """Records the arguments of the last launch instead of launching."""

    last_args: tuple = ()

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        type(self).last_args = args


class _StandInUtils:
    @staticmethod
    def load_binary(name, kernel, shared, device):
        return "module", "function", 0, 0, 1024

    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 232448}


class StandInDriver:
    """A triton driver for an sm_90 device whose launches do nothing: with it active
    (`triton.runtime.driver.set_active(StandInDriver())`), JITFunction.run binds, specializes, compiles and
    caches as on an H100, and CompiledKernel launches run their Python path; the launcher records the
    arguments of the last launch in `StandInDriver.launcher_cls.last_args`."""

    launcher_cls = _StandInLauncher
    utils = _StandInUtils

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    @staticmethod
    def forget(*kernels) -> None:
        """Drop the stand-in module handles of kernels launched under this driver, so that their finalizers
        (run later, when no driver or the real one is active) have nothing to unload."""
        for kernel in kernels:
            kernel.module = None


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
