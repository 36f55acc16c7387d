"""Compile every Triton kernel of blocks/ for an NVIDIA GPU without one, and report their registers.

    python bench/compile_triton_kernels.py [--arch 90]

Triton's own compiler and the ptxas it ships turn each kernel, at the block sizes and warps the host code
launches it with, into a cubin for compute capability --arch (90: H100/H200). A kernel that does not
compile on a GPU fails here too, which Triton's CPU interpreter (the tests) cannot show. Registers per
thread and spill (stack) bytes come from cuobjdump, also shipped with Triton. Exit status 1 when a kernel
fails to compile. Nothing runs: whether the kernels are fast is for bench/gpu_check.py, on a GPU.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_triton_kernels: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from blocks import causal_conv_triton as conv  # noqa: E402
from blocks import scan_triton as scan  # noqa: E402

INTEGERS = {"dim", "nstate", "length", "nchunks", "batch", "blocks_per_group", "nrows", "stride_b", "stride_e",
            "stride_l"}
# Tensors that autocast hands over in float16: each kernel that takes them is compiled both ways.
HALF_INPUTS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr",
               "dz_ptr", "x_ptr", "dx_ptr"}


def specialisations():
    """(label, kernel, constexprs, warps): the launches of blocks/ at EM-Net's d_state 16, width 4."""
    common = dict(SOFTPLUS=True, HAS_Z=True, BLOCK_D=scan.BLOCK_D, BLOCK_N=16, CHUNK=scan.CHUNK)
    link = dict(BLOCK_R=scan.BLOCK_ROWS, BLOCK_C=scan.LINK_CHUNKS, BLOCK_N=16)
    return [
        ("scan forward, first pass", scan._forward_kernel, {**common, "FINAL": False}, scan.FORWARD_WARPS),
        ("scan forward, final pass", scan._forward_kernel, {**common, "FINAL": True}, scan.FORWARD_WARPS),
        ("scan adjoint", scan._adjoint_kernel, common, scan.FORWARD_WARPS),
        ("scan backward", scan._backward_kernel, common, scan.BACKWARD_WARPS),
        ("chunk link", scan._link_kernel, {**link, "REVERSE": True}, scan.LINK_WARPS),
        ("conv forward", conv._conv_forward_kernel, dict(WIDTH=4, BLOCK_E=conv.BLOCK_E, BLOCK_L=conv.BLOCK_L), 4),
        ("conv backward", conv._conv_backward_kernel,
         dict(WIDTH=4, BLOCK_E=conv.BACKWARD_BLOCK_E, BLOCK_L=conv.BACKWARD_BLOCK_L), 4),
    ]


def compile_kernel(kernel, constexprs, warps, arch, half):
    signature = {name: "constexpr" if name in constexprs else "i32" if name in INTEGERS else
                 "*fp16" if half and name in HALF_INPUTS else "*fp32" for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def resources(compiled):
    """(registers, stack bytes) of a compiled kernel, from cuobjdump -res-usage."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    return found.groups() if found else ("?", "?")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    args = parser.parse_args()
    print(f"| kernel | inputs | warps | registers | spill bytes |  (sm_{args.arch}, triton {triton.__version__})")
    print("|---|---|---|---|---|")
    failed = 0
    for label, kernel, constexprs, warps in specialisations():
        for half in (False, True)[:1 + bool(HALF_INPUTS & set(kernel.arg_names))]:
            try:
                registers, stack = resources(compile_kernel(kernel, constexprs, warps, args.arch, half))
            except Exception as error:  # reported, and the other kernels are still compiled
                registers, stack, failed = f"FAILED: {type(error).__name__}: {error}"[:300], "-", failed + 1
            print(f"| {label} | {'float16' if half else 'float32'} | {warps} | {registers} | {stack} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
