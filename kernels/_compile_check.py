"""Compile every Triton kernel variant for real GPU targets, without a GPU (ahead-of-time, to PTX and cubin).

The interpreter is lenient about things the real compiler rejects; this catches those on a CPU-only machine.
Run in a fresh process without TRITON_INTERPRET (the interpreter patches triton.language in-process):

    python -m tsc_fast.kernels._compile_check 80 90
"""
from __future__ import annotations

import os
import sys

COEFFICIENTS = ("c0_hi", "c0_lo", "c1_hi", "c1_lo", "c2_hi", "c2_lo")


def _compile(kernel, constexprs: dict, pointer_types: dict, capability: int, float_args=(), num_warps: int = 8):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in float_args else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def compile_all(capability: int) -> list[str]:
    """Compile the kernels' variants for compute capability ``capability``; the names of those compiled."""
    from . import _triton_bezier, _triton_correlation

    done = []
    for self_stats, precision, flat, dtype in [
        (True, "tf32", False, "*bf16"), (False, "ieee", True, "*fp16"), (False, "tf32x3", False, "*fp32"),
        (True, "ieee", True, "*fp32"),
    ]:
        constexprs = dict(SELF=self_stats, PRECISION=precision, X_FLAT=flat, Y_FLAT=flat, BLOCK_N=128, BLOCK_M=32)
        compiled = _compile(_triton_correlation._correlation_batch_kernel, constexprs,
                            {"x_ptr": dtype, "y_ptr": dtype}, capability)
        assert compiled.asm["ptx"]
        done.append(f"correlation self={self_stats} {precision} flat={flat} {dtype}")
    for wide, dtype in [(False, "*fp32"), (False, "*bf16"), (True, "*fp64")]:
        pointers = {name: dtype for name in ("a_ptr", "m_ptr", "b_ptr", "out_ptr", "g_ptr", "ga_ptr", "gm_ptr",
                                             "gb_ptr")}
        _compile(_triton_bezier._bezier_combine_kernel, dict(BLOCK=2048, WIDE=wide), pointers, capability,
                 COEFFICIENTS)
        _compile(_triton_bezier._bezier_grad_kernel,
                 dict(BLOCK=2048, WIDE=wide, NEED_A=True, NEED_M=True, NEED_B=False), pointers, capability,
                 COEFFICIENTS)
        done.append(f"bezier forward+backward {dtype}")
    return done


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the compile check needs the real compiler", file=sys.stderr)
        return 2
    for capability in [int(arg) for arg in argv] or [90]:
        for name in compile_all(capability):
            print(f"sm_{capability}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
