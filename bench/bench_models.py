"""Every registered model side by side: training step, inference window and peak memory (paper Table 3).

    python bench/bench_models.py                          # CPU, window 64, every registered model
    python bench/bench_models.py --device cuda            # GPU, window 128 (the paper's Table 3 setting)
    python bench/bench_models.py --models em-net swin_unetr --repeats 3 --no-append

Each model is built from its own config, configs/models/<name>.yaml ('-' read as '_'), at a cubic window
(default 64 on a CPU, 128 on a GPU), 1 input channel and 9 classes, batch 1, in a fresh process of its
own. "train" is one full training step (forward in train mode, backward of the mean square of every output,
so deep-supervision heads are included, and an AdamW step); "infer" is one forward of one window in eval mode
under no_grad. Each is run --warmup times untimed, then --repeats times: the median is reported.
Memory on a CPU: the growth of the process's peak RSS (Linux VmHWM, reset through /proc/self/clear_refs)
over its RSS before the model was built, so weights, gradients, optimizer state, activations and one-time
runtime allocations all count; on a GPU: torch.cuda.max_memory_allocated. Ratios are to EM-Net (em-net).
The table goes to stdout and, with the machine, the load average and the date, is appended to
docs/benchmarks.md (--output; --no-append to skip).
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import describe as describe_machine  # bench/ is this script's folder, first on sys.path
from rss import reset_peak_rss, status_kb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = "em-net"


# ------------------------------------------------------------------------------------------------ worker


def build(name, window, device):
    import config
    import models

    path = config.CONFIG_DIR / "models" / f"{name.replace('-', '_')}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config {path.relative_to(ROOT)}")
    cfg = config.resolve_config(model_config=str(path), overrides=[f"model.roi_size=[{window},{window},{window}]"])
    return models.build_model(name, **config.model_kwargs(cfg)).to(device), cfg["model"]["in_channels"]


def _outputs(out):
    return out if isinstance(out, (list, tuple)) else [out]


def measure(name, window, device_name, warmup, repeats):
    import torch

    device = torch.device(device_name)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timed(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    torch.manual_seed(0)
    rss0 = 0 if cuda else status_kb("VmRSS")
    model, in_channels = build(name, window, device)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, in_channels, window, window, window, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = sum(o.float().square().mean() for o in _outputs(model(x)))
        loss.backward()
        optimizer.step()

    def infer():
        with torch.no_grad():
            model(x)

    def timed_with_peak(fn):
        """(median seconds, peak MB while running `fn`)."""
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()
        seconds = timed(fn)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else (status_kb("VmHWM") - rss0) / 1024
        return seconds, peak

    model.eval()
    infer_s, infer_mb = timed_with_peak(infer)
    model.train()
    train_s, train_mb = timed_with_peak(train_step)
    return {"model": name, "params": params, "train_s": train_s, "infer_s": infer_s,
            "train_mb": train_mb, "infer_mb": infer_mb}


# ------------------------------------------------------------------------------------------------ parent


def run_worker(name, args):
    command = [sys.executable, __file__, "--worker", name, "--device", args.device, "--window", str(args.window),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": name, "note": f"over --timeout {args.timeout} s"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        error = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return {"model": name, "note": (error[-1] if error else f"exit status {result.returncode}")[:200]}
    row = json.loads(lines[-1])
    print(f"  {name}: {time.perf_counter() - start:.0f} s {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def load_average():
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def ratio(row, ref, key):
    if key not in row or ref is None or key not in ref:
        return "-"
    return f"{row[key] / ref[key]:.2f}"


def format_table(rows):
    ref = next((r for r in rows if r["model"] == REFERENCE and "train_s" in r), None)
    lines = ["| model | params (M) | train step s | infer s | peak MB train | peak MB infer | "
             "train / EM-Net | infer / EM-Net | memory / EM-Net | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        if "train_s" in row:
            cells = [f"{row['params'] / 1e6:.2f}", f"{row['train_s']:.3f}", f"{row['infer_s']:.3f}",
                     f"{row['train_mb']:.0f}", f"{row['infer_mb']:.0f}", ratio(row, ref, "train_s"),
                     ratio(row, ref, "infer_s"), ratio(row, ref, "train_mb"), ""]
        else:
            cells = ["-"] * 8 + [row["note"]]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--window", type=int, help="cubic window side (default 64 on cpu, 128 on cuda)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="registered names (default: all)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each measurement (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per model before it is given up")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown file appended to")
    parser.add_argument("--no-append", dest="append", action="store_false", help="print only")
    parser.add_argument("--worker", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.window is None:
        args.window = 128 if args.device.startswith("cuda") else 64
    if args.worker:
        print(json.dumps(measure(args.worker, args.window, args.device, args.warmup, args.repeats)))
        return

    import models

    names = args.models or models.list_models()
    unknown = sorted(set(names) - set(models.list_models()))
    if unknown:
        parser.error(f"unknown models {unknown}; registered: {', '.join(models.list_models())}")
    names = sorted(names, key=lambda n: (n != REFERENCE, n))
    started, machine = datetime.datetime.now(datetime.timezone.utc), describe_machine(args.device)
    print(f"benchmarking {len(names)} models at {args.window}^3 on {args.device} ...", file=sys.stderr, flush=True)
    rows = [run_worker(name, args) for name in names]
    load_after = load_average()
    table = format_table(rows)
    header = (f"`python bench/bench_models.py --device {args.device} --window {args.window} --repeats {args.repeats}`, "
              f"{started:%Y-%m-%d %H:%M} UTC, batch 1, window {args.window}^3, 1 input channel, 9 classes. "
              f"Machine at the start: {machine}. Load average (1/5/15 min) at the end {load_after}.")
    print(header)
    print(table)
    if args.append:
        with open(args.output, "a") as f:
            heading = f"### {args.device}, window {args.window}^3, {started:%Y-%m-%d %H:%M} UTC"
            f.write(f"\n{heading}\n\n{header}\n\n{table}\n")
        print(f"appended to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
