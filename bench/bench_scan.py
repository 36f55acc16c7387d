"""Selective-scan timing and memory on CPU: our backends beside mambapy's pscan and a Python loop.

    python bench/bench_scan.py [--lengths 4096 32768] [--loop-length 4096] [--torch-length 4096] [--repeats 2]

Batch 1, D 96, N 16, float32, softplus, D and z present. "fwd" is a forward under no_grad,
"fwd+bwd" a forward with gradients enabled plus backward of y.sum(). Each method gets one untimed
fwd+bwd, then times are the best of --repeats (one run when a run takes over 10 s). The slow
methods (Python loop, torch backend) are timed at a shorter L and scaled linearly where marked
"xN"; the loop's backward grows faster than linearly in L (its slices' gradients are full-length),
so the scaled time favours the loop. Memory: peak RSS growth (Linux VmHWM, reset through
/proc/self/clear_refs) during the first, untimed fwd+bwd, which includes one-time runtime
allocations, and the bytes autograd saved for backward (saved_tensors_hooks). Each method and L
runs in a fresh process, so the peak is not hidden by memory an earlier method freed.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from machine import describe as describe_machine  # bench/ is this script's folder, first on sys.path
from rss import reset_peak_rss, status_kb

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models.selective_scan as ss  # noqa: E402

BATCH, DIM, NSTATE = 1, 96, 16


def make_inputs(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"u": torch.randn(BATCH, DIM, length, generator=g),
            "delta": torch.randn(BATCH, DIM, length, generator=g) * 0.5 - 2.0,
            "A": -torch.exp(torch.rand(DIM, NSTATE, generator=g) * 2.7),
            "B": torch.randn(BATCH, NSTATE, length, generator=g),
            "C": torch.randn(BATCH, NSTATE, length, generator=g),
            "D": torch.randn(DIM, generator=g),
            "z": torch.randn(BATCH, DIM, length, generator=g),
            "delta_bias": torch.randn(DIM, generator=g) * 0.1}


def backend_scan(name):
    def run(x):
        ss.set_scan_backend(name)
        try:
            return ss.selective_scan(**x, delta_softplus=True)
        finally:
            ss.set_scan_backend("auto")
    return run


def mambapy_scan(x):
    """mambapy's MambaBlock.selective_scan (layout (B, L, D, N), then pscan) with our softplus and gate."""
    from mambapy.pscan import pscan

    dt = F.softplus(x["delta"] + x["delta_bias"][:, None]).transpose(1, 2)   # (B, L, D)
    u = x["u"].transpose(1, 2)
    delta_a = torch.exp(dt.unsqueeze(-1) * x["A"])                          # (B, L, D, N)
    bx = (dt * u).unsqueeze(-1) * x["B"].transpose(1, 2).unsqueeze(2)        # (B, L, D, N)
    hs = pscan(delta_a, bx)
    y = (hs @ x["C"].transpose(1, 2).unsqueeze(-1)).squeeze(3) + x["D"] * u
    return y.transpose(1, 2) * F.silu(x["z"])


def loop_scan(x):
    """The Python loop over L of mamba-ssm's selective_scan_ref, autograd through every step."""
    dt = F.softplus(x["delta"] + x["delta_bias"][:, None])
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", dt, x["A"]))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", dt, x["B"], x["u"])
    h = x["u"].new_zeros(BATCH, DIM, NSTATE)
    ys = []
    for t in range(x["u"].shape[2]):
        h = delta_a[:, :, t] * h + delta_b_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, x["C"][:, :, t]))
    y = torch.stack(ys, dim=2) + x["u"] * x["D"][:, None]
    return y * F.silu(x["z"])


def _fwd_bwd(fn, x):
    """One forward with gradients and backward; returns the bytes autograd saved for backward."""
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t):
        y = fn(leaves)
    y.sum().backward()
    return sum(sizes)


def measure(fn, length, repeats):
    """(fwd s, fwd+bwd s, peak RSS growth MB, saved MB); run in a fresh process per method and L."""
    x = make_inputs(length)
    # The first fwd+bwd gives the peak memory (nothing freed earlier to reuse) and stays untimed:
    # in this VM the first touch of fresh memory is slow, which is not the method's cost.
    reset_peak_rss()
    rss0 = status_kb("VmRSS")
    saved = _fwd_bwd(fn, x)
    peak = (status_kb("VmHWM") - rss0) / 1024
    fwd, both = [], []
    for _ in range(repeats):
        with torch.no_grad():
            start = time.perf_counter()
            fn(x)
            fwd.append(time.perf_counter() - start)
        if fwd[-1] > 10:
            break
    for _ in range(repeats):
        start = time.perf_counter()
        _fwd_bwd(fn, x)
        both.append(time.perf_counter() - start)
        if both[-1] > 10:
            break
    return min(fwd), min(both), peak, saved / 2**20


def _method(label):
    if label.startswith("ss:"):
        name = label[3:]
        backend_scan(name)(make_inputs(64))  # compile or load the cached numba kernels, untimed
        return backend_scan(name)
    return {"mambapy pscan": mambapy_scan, "python loop": loop_scan}[label]


def measure_in_subprocess(label, length, repeats):
    command = [sys.executable, os.path.abspath(__file__), "--worker", label, str(length), str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--loop-length", type=int, default=4096,
                        help="largest L at which the Python loop is timed; scaled linearly beyond")
    parser.add_argument("--torch-length", type=int, default=4096,
                        help="largest L at which the torch backend is timed; scaled linearly beyond")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "L", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        label, length, repeats = args.worker
        print(json.dumps(measure(_method(label), int(length), int(repeats))))
        return

    print(describe_machine())
    backends = [name for name in ss.available_scan_backends() if name != "cuda"]
    print("\n| L | method | fwd s | fwd+bwd s | peak RSS MB | saved MB | fwd+bwd: x pscan | x loop |")
    print("|---|---|---|---|---|---|---|---|")
    methods = [(f"ss:{name}", args.torch_length if name == "torch" else None) for name in backends]
    methods += [("mambapy pscan", None), ("python loop", args.loop_length)]
    timed = {}  # (method, measured L) -> times, so a scaled measurement is taken once
    for length in args.lengths:
        results = {}
        for label, longest in methods:
            measured = min(length, longest or length)
            scale = length / measured
            if (label, measured) not in timed:
                timed[label, measured] = measure_in_subprocess(label, measured, args.repeats)
            times = timed[label, measured]
            label = label if scale == 1 else f"{label} (L={measured}, x{scale:g})"
            results[label] = [value * scale for value in times]
        pscan_time = results["mambapy pscan"][1]
        loop_time = next(v for k, v in results.items() if k.startswith("python loop"))[1]
        for label, (fwd, both, peak, saved) in results.items():
            print(f"| {length} | {label} | {fwd:.3f} | {both:.3f} | {peak:.0f} | {saved:.1f} | "
                  f"{pscan_time / both:.1f} | {loop_time / both:.0f} |", flush=True)
    print("\nRows marked (L=..., xN) were timed at that shorter L and scaled linearly (time and memory).")


if __name__ == "__main__":
    main()
