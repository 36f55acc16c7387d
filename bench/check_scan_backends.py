"""Check one scan backend against another, on outputs and on the gradients of every input, and time both.

On a GPU machine with mamba-ssm installed (the check the CPU machines cannot run):
    python bench/check_scan_backends.py                      # cuda (on the GPU) vs numba (on the CPU)
Anywhere:
    python bench/check_scan_backends.py --test torch --reference numba

Exits with status 1 when a relative error reaches --tolerance (1e-3 by default).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.selective_scan import available_scan_backends, selective_scan, set_scan_backend  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, length, state, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5 - 1.0,
        "A": -torch.rand(dim, state, generator=g) * 4 - 0.1,
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.randn(dim, generator=g) * 0.1,
    }


def device_for(backend):
    return torch.device("cuda") if backend == "cuda" else torch.device("cpu")


def run(backend, inputs, grad_out):
    """Output, gradients of every input and seconds for forward+backward with `backend`."""
    set_scan_backend(backend)
    device = device_for(backend)
    leaves = {k: v.detach().to(device, copy=True).requires_grad_() for k, v in inputs.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    y = selective_scan(**leaves, delta_softplus=True)
    y.backward(grad_out.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return y.detach().cpu(), {k: v.grad.cpu() for k, v in leaves.items()}, seconds


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", default="cuda", help="backend under test (default cuda)")
    parser.add_argument("--reference", default="numba", help="backend it is compared with (default numba)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    for backend in (args.test, args.reference):
        if backend not in available_scan_backends():
            sys.exit(f"scan backend {backend!r} is not available here (available: {available_scan_backends()})")

    worst = 0.0
    for length in args.lengths:
        inputs = make_inputs(args.batch, args.dim, length, args.state)
        grad_out = torch.randn(args.batch, args.dim, length, generator=torch.Generator().manual_seed(1))
        run(args.test, inputs, grad_out)  # warm-up: compilation, kernel loading
        run(args.reference, inputs, grad_out)
        y_test, g_test, t_test = run(args.test, inputs, grad_out)
        y_ref, g_ref, t_ref = run(args.reference, inputs, grad_out)
        errors = {"y": relative_error(y_test, y_ref)}
        errors.update({f"d{k}": relative_error(g_test[k], g_ref[k]) for k in NAMES})
        worst = max(worst, *errors.values())
        print(f"L={length}: {args.test} {t_test:.4f} s, {args.reference} {t_ref:.4f} s fwd+bwd "
              f"({t_ref / t_test:.1f}x); relative errors: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    verdict = "OK" if worst < args.tolerance else "FAILED"
    print(f"{verdict}: largest relative error {worst:.2e} (tolerance {args.tolerance:g})")
    sys.exit(0 if worst < args.tolerance else 1)


if __name__ == "__main__":
    main()
