"""The triton backend on a fresh CUDA machine, in one run that writes a JSON and a Markdown report.

On a GPU machine with PyTorch and Triton but no internet and none of this project's other packages
(README, "GPU check", says how to download the wheels beforehand):
    python bench/gpu_check.py --wheels wheels/ --output gpu_check     # writes gpu_check.json, gpu_check.md
A smoke run of the same code on a CPU (tiny shapes, few steps, kernels in Triton's interpreter, nothing
installed), which tests/test_scan_triton.py runs:
    python bench/gpu_check.py --smoke --output /tmp/gpu_check_smoke

Sections, each recorded with pass/fail and its numbers:
  install       pip install --no-index --find-links WHEELS of requirements.txt less torch, then the imports
  scan          triton vs torch (vs cuda where mamba-ssm imports): outputs and every gradient within 1e-3
                relative, bitwise-reproducible gradients, fwd+bwd time and peak memory at L 32768 and at
                EM-Net's stage shapes (roi 128, 4 crops: E = 2 x 48..384, L = 32^3 .. 4^3, N 16)
  conv          causal convolution + SiLU, Triton vs PyTorch (vs causal-conv1d): agreement, fwd+bwd time
  models        EM-Net (configs/models/em_net.yaml) and Swin UNETR (swin_unetr.yaml) training iterations/s
                and peak memory: roi 128, batch 1, AMP, train.py's training step
  amp_training  20 AMP training steps of EM-Net on generated phantoms: every loss finite
  inference     one 128^3 window in float16 (autocast) and in float32: argmax agreement of >= 99% of voxels
Targets: triton scan fwd+bwd >= 10x the torch backend and within 2x of mamba-ssm where installed; EM-Net
>= 2x Swin UNETR iterations/s (the paper: 10.68 vs 4.94). Speed is not judged in the smoke run.

Sections run in a child process, in order; one that fails is recorded and the rest go on in a new child
(a CUDA error can leave a process unusable), one that crashes or passes its time limit likewise. The whole
run stays under 8 minutes. Exit status 0 when no check failed.
"""
import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("scan", "conv", "models", "amp_training", "inference")
LIMITS = {"scan": 150, "conv": 60, "models": 150, "amp_training": 90, "inference": 60}  # seconds
TOTAL_SECONDS = 465  # install included: under 8 minutes
TOLERANCE = 1e-3
FEATURES = (48, 96, 192, 384)  # EM-Net's stage widths (configs/models/em_net.yaml); Mamba's E is twice that


# ---------------------------------------------------------------------------------------------- helpers

def check(name, value, target, passed):
    """One judged number; passed None when it is only recorded (speed in the smoke run)."""
    return {"name": name, "value": value, "target": target, "passed": passed}


def section_result(checks, rows=(), notes=()):
    judged = [c["passed"] for c in checks if c["passed"] is not None]
    return {"passed": all(judged) if judged else None, "checks": checks, "rows": list(rows), "notes": list(notes)}


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def median_seconds(fn, ctx, warmup, repeats):
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if ctx.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if ctx.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mb(fn, ctx):
    """Peak CUDA memory while `fn` runs, above what was allocated before (None on the CPU: not run)."""
    import torch

    if not ctx.cuda:
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


class Context:
    """What every section needs: the device, the smoke flag, repeats, windows and the models' scan backend."""

    def __init__(self, smoke, backend):
        import torch

        self.smoke = smoke
        self.cuda = not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.backend = backend or ("auto" if smoke else "triton")
        self.warmup, self.repeats = (0, 1) if smoke else (2, 5)
        self.train_warmup, self.train_repeats = (0, 1) if smoke else (3, 10)

    def roi(self, name):
        """The window: 128 (the paper's); in the smoke run each model's smallest (Swin UNETR's is 64)."""
        return 128 if not self.smoke else 64 if name == "swin_unetr" else 32


# ------------------------------------------------------------------------------------------------- scan

def scan_shapes(smoke):
    """(label, batch, D, L, N): L 32768 as bench/check_scan_backends.py, then EM-Net's stages at roi 128."""
    if smoke:
        return [("L 40", 1, 4, 40, 4), ("stage-like", 2, 4, 33, 16)]
    stages = [(f"stage {i + 1}", 4, 2 * f, (128 // 2 ** (i + 2)) ** 3, 16) for i, f in enumerate(FEATURES)]
    return [("L 32768", 1, 96, 32768, 16), *stages]


def scan_once(backend, inputs, grad_out):
    from blocks.selective_scan import selective_scan, set_scan_backend

    set_scan_backend(backend)
    try:
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}  # new leaves, no copies
        y = selective_scan(**leaves, delta_softplus=True)
        y.backward(grad_out)
    finally:
        set_scan_backend("auto")
    return [y.detach()] + [v.grad for v in leaves.values()]


def scan_row(label, shape, backends, ctx):
    """One shape: every backend's error against the reference backend, time, memory; triton reproducible."""
    import torch
    from check_scan_backends import make_inputs  # bench/ is this script's folder, first on sys.path

    batch, dim, length, nstate = shape
    inputs = {k: v.to(ctx.device) for k, v in make_inputs(batch, dim, length, nstate).items()}
    grad_out = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1)).to(ctx.device)
    reference = "cuda" if "cuda" in backends else "torch"
    expected = scan_once(reference, inputs, grad_out)
    row = {"shape": label, "B x D x L x N": "x".join(map(str, shape))}
    for backend in backends:
        got = expected if backend == reference else scan_once(backend, inputs, grad_out)
        if backend != reference:
            row[f"{backend} vs {reference} error"] = max(relative_error(a, b) for a, b in zip(got, expected))
        if backend == "triton":
            again = scan_once(backend, inputs, grad_out)
            row["triton reproducible"] = all(torch.equal(a, b) for a, b in zip(got, again))
        row[f"{backend} ms"] = 1e3 * median_seconds(lambda b=backend: scan_once(b, inputs, grad_out), ctx,
                                                    ctx.warmup, ctx.repeats)
        row[f"{backend} peak MB"] = peak_mb(lambda b=backend: scan_once(b, inputs, grad_out), ctx)
    return row


def scan_checks(row, ctx):
    label = row["shape"]
    checks = [check(f"{label}: {key}", row[key], f"< {TOLERANCE:g}", row[key] < TOLERANCE)
              for key in row if key.endswith(" error")]
    checks.append(check(f"{label}: triton gradients bitwise reproducible", row["triton reproducible"], True,
                        row["triton reproducible"]))
    speedup = row["torch ms"] / row["triton ms"]
    checks.append(check(f"{label}: torch / triton fwd+bwd time", speedup, ">= 10",
                        None if ctx.smoke else speedup >= 10))
    if "cuda ms" in row:
        ratio = row["triton ms"] / row["cuda ms"]
        checks.append(check(f"{label}: triton / cuda fwd+bwd time", ratio, "<= 2", None if ctx.smoke else ratio <= 2))
    return checks


def scan_tuning(shape, ctx):
    """fwd+bwd ms of other tile shapes at one shape, for tuning scan_triton's constants (not judged)."""
    import torch
    from check_scan_backends import make_inputs

    from blocks import scan_triton

    inputs = {k: v.to(ctx.device) for k, v in make_inputs(*shape).items()}
    grad_out = torch.randn(*shape[:3], device=ctx.device)
    default = (scan_triton.CHUNK, scan_triton.BLOCK_D)
    notes = []
    try:
        for chunk, block_d in ((64, 4), (128, 2), (256, 1)):
            scan_triton.CHUNK, scan_triton.BLOCK_D = chunk, block_d
            ms = 1e3 * median_seconds(lambda: scan_once("triton", inputs, grad_out), ctx, 1, 3)
            notes.append(f"tuning at {'x'.join(map(str, shape))}: CHUNK {chunk}, BLOCK_D {block_d}: "
                         f"{ms:.2f} ms fwd+bwd")
    finally:
        scan_triton.CHUNK, scan_triton.BLOCK_D = default
    return notes


def section_scan(ctx):
    from blocks.selective_scan import available_scan_backends

    backends = ["triton", "torch"] + (["cuda"] if "cuda" in available_scan_backends() else [])
    rows, checks = [], []
    for label, *shape in scan_shapes(ctx.smoke):
        rows.append(scan_row(label, shape, backends, ctx))
        checks += scan_checks(rows[-1], ctx)
    notes = [] if ctx.smoke else scan_tuning(scan_shapes(False)[1][1:], ctx)
    notes.append(f"backends: {', '.join(backends)}; errors are ||a - b|| / ||b|| over y and every gradient")
    return section_result(checks, rows, notes)


# ------------------------------------------------------------------------------------------------- conv

def conv_paths():
    from blocks.causal_conv import _cuda_kernel, causal_conv1d_silu_torch
    from blocks.causal_conv_triton import causal_conv1d_silu_triton

    paths = {"triton": causal_conv1d_silu_triton, "torch": causal_conv1d_silu_torch}
    kernel = _cuda_kernel()
    if kernel is not None:
        paths["causal-conv1d"] = lambda x, w, b: kernel(x.contiguous(), w.squeeze(1), b, activation="silu")
    return paths


def conv_once(fn, projected, weight, bias, grad_out):
    """Output and gradients of fn on x as Mamba hands it over: a channels-last view (B, E, L) of the input
    projection's output `projected` (B, L, 2E)."""
    leaves = [t.detach().requires_grad_() for t in (projected, weight, bias)]  # new leaves, no copies
    out = fn(leaves[0].transpose(1, 2)[:, :weight.shape[0]], *leaves[1:])
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def section_conv(ctx):
    import torch

    paths = conv_paths()
    rows, checks = [], []
    shapes = [(2, 6, 70)] if ctx.smoke else [(4, 2 * f, (128 // 2 ** (i + 2)) ** 3) for i, f in enumerate(FEATURES)]
    for batch, dim, length in shapes:
        g = torch.Generator().manual_seed(0)
        projected = torch.randn(batch, length, 2 * dim, generator=g).to(ctx.device)
        weight, bias = torch.randn(dim, 1, 4, generator=g).to(ctx.device), torch.randn(dim, generator=g).to(ctx.device)
        grad_out = torch.randn(batch, dim, length, generator=g).to(ctx.device)
        expected = conv_once(paths["torch"], projected, weight, bias, grad_out)
        row = {"B x E x L": f"{batch}x{dim}x{length}"}
        for name, fn in paths.items():
            if name != "torch":
                got = conv_once(fn, projected, weight, bias, grad_out)
                error = max(relative_error(a, b) for a, b in zip(got, expected))
                row[f"{name} vs torch error"] = error
                checks.append(check(f"{row['B x E x L']}: {name} vs torch error", error, f"< {TOLERANCE:g}",
                                    error < TOLERANCE))
            timed = functools.partial(conv_once, fn, projected, weight, bias, grad_out)
            row[f"{name} ms"] = 1e3 * median_seconds(timed, ctx, ctx.warmup, ctx.repeats)
        if "causal-conv1d ms" in row:
            ratio = row["triton ms"] / row["causal-conv1d ms"]
            checks.append(check(f"{row['B x E x L']}: triton / causal-conv1d time", ratio, "<= 2",
                                None if ctx.smoke else ratio <= 2))
        rows.append(row)
    return section_result(checks, rows, [f"paths: {', '.join(paths)}; fwd+bwd times"])


# ----------------------------------------------------------------------------------------------- models

def build(name, ctx):
    """(model, resolved config) of a registered model from its config, at the check's window."""
    import torch

    import config
    import models

    config_name = name.replace("-", "_")
    roi = ctx.roi(name)
    overrides = [f"model.roi_size=[{roi},{roi},{roi}]"]
    if ctx.smoke:  # CPU-sized: EM-Net's tiny config, Swin UNETR at a quarter of its width
        config_name = {"em_net": "em_net_tiny"}.get(config_name, config_name)
        overrides += ["model.feature_size=12"] if name == "swin_unetr" else []
    cfg = config.resolve_config(model_config=config_name, overrides=overrides)
    torch.manual_seed(0)
    return models.build_model(name, **config.model_kwargs(cfg)).to(ctx.device), cfg


def phantom_batch(ctx, roi, seed=0):
    """A generated CT phantom filling one window (data/synthetic.py), windowed as configs/defaults.yaml."""
    import numpy as np
    import torch

    from data.synthetic import make_case

    image, label, _ = make_case(np.random.default_rng(seed), shape=(roi,) * 3, spacing=(100.0 / roi,) * 3)
    image = np.clip((image.astype(np.float32) + 175.0) / 425.0, 0.0, 1.0)
    return {"image": torch.from_numpy(image)[None, None].to(ctx.device),
            "label": torch.from_numpy(label.astype(np.int64))[None, None].to(ctx.device)}


def training_step(model, cfg, ctx):
    """The training step of train.py (AMP on the GPU) with its loss, as a function of a batch."""
    import torch

    from engine.step import make_loss, train_step

    t = cfg["trainer"]
    loss_fn = make_loss(t["deep_supervision_weights"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=ctx.cuda)
    return lambda batch: train_step(model, batch, loss_fn, optimizer, scaler, t, ctx.device, ctx.cuda)


def training_speed(name, ctx):
    """Training iterations/s and peak memory of one model on a phantom at its window."""
    model, cfg = build(name, ctx)
    step, batch = training_step(model, cfg, ctx), phantom_batch(ctx, ctx.roi(name))
    seconds = median_seconds(lambda: step(batch), ctx, ctx.train_warmup, ctx.train_repeats)
    return {"model": name, "roi": ctx.roi(name), "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
            "train it/s": 1.0 / seconds, "peak MB": peak_mb(lambda: step(batch), ctx)}


def section_models(ctx):
    import torch

    from blocks.selective_scan import set_scan_backend

    set_scan_backend(ctx.backend)
    rows = []
    for name in ("em-net", "swin_unetr"):
        rows.append(training_speed(name, ctx))
        if ctx.cuda:
            torch.cuda.empty_cache()
    ratio = rows[0]["train it/s"] / rows[1]["train it/s"]
    checks = [check("EM-Net / Swin UNETR training iterations/s", ratio, ">= 2 (paper 2.16)",
                    None if ctx.smoke else ratio >= 2)]
    return section_result(checks, rows, [f"scan backend {ctx.backend}, batch 1, AMP {ctx.cuda}"])


def section_amp_training(ctx):
    import math

    from blocks.selective_scan import set_scan_backend

    set_scan_backend(ctx.backend)
    model, cfg = build("em-net", ctx)
    step = training_step(model, cfg, ctx)
    batches = [phantom_batch(ctx, ctx.roi("em-net"), seed) for seed in range(2)]
    losses, outcomes = [], []
    for i in range(2 if ctx.smoke else 20):
        loss, outcome = step(batches[i % 2])
        losses.append(float(loss))
        outcomes.append(outcome)
    finite = all(math.isfinite(v) for v in losses)
    checks = [check("every loss finite", finite, True, finite)]
    notes = [f"losses {', '.join(f'{v:.4f}' for v in losses)}", f"step outcomes {', '.join(outcomes)}"]
    return section_result(checks, notes=notes)


def section_inference(ctx):
    import torch

    from blocks.selective_scan import set_scan_backend

    set_scan_backend(ctx.backend)
    model, _ = build("em-net", ctx)
    model.eval()
    x = phantom_batch(ctx, ctx.roi("em-net"))["image"]
    with torch.no_grad():
        full = model(x).float()
        with torch.autocast(ctx.device.type, dtype=torch.float16):
            reduced = model(x).float()
    agreement = float((full.argmax(1) == reduced.argmax(1)).double().mean())
    top2 = full.topk(2, dim=1).values
    close = float(((top2[:, 0] - top2[:, 1]) < 1e-3).double().mean())
    checks = [check("argmax agreement, float16 vs float32", agreement, ">= 0.99", agreement >= 0.99)]
    notes = [f"voxels whose float32 top-2 logits differ by < 1e-3: {close:.4f}",
             f"largest logit difference {float((full - reduced).abs().max()):.3g}"]
    return section_result(checks, notes=notes)


SECTION_FUNCTIONS = {"scan": section_scan, "conv": section_conv, "models": section_models,
                     "amp_training": section_amp_training, "inference": section_inference}


# ------------------------------------------------------------------------------------------ child process

def emit(path, event):
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")


def run_child(names, results, smoke, backend):
    """Run the sections `names` in order, appending a start and an end event per section to `results`;
    after an exception on the GPU, exit (status 3) so that the parent goes on in a fresh process."""
    sys.path.insert(0, str(ROOT))
    ctx = Context(smoke, backend)
    if smoke:
        from blocks import triton_support

        triton_support.speed_up_interpreter()
    for name in names:
        emit(results, {"section": name, "event": "start"})
        start = time.perf_counter()
        try:
            result = SECTION_FUNCTIONS[name](ctx)
        except Exception as error:  # recorded, and the next sections still run
            result = {"passed": False, "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        emit(results, {"section": name, "event": "end", "result": result})
        if "error" in result and ctx.cuda:
            sys.exit(3)


# ----------------------------------------------------------------------------------------- parent process

def read_events(path, seen):
    """Complete lines of `path` after the first `seen`, parsed, and the new count."""
    lines = Path(path).read_text().split("\n")[:-1] if Path(path).exists() else []
    return [json.loads(line) for line in lines[seen:]], len(lines)


def run_sections(pending, child_command, limits, deadline):
    """{section: result}: children run the pending sections in order, a new child after each one that
    fails, crashes or runs past min(its limit, the deadline); `child_command(names, results_path)`."""
    done = {}
    while pending:
        handle, results = tempfile.mkstemp(suffix=".jsonl")
        os.close(handle)
        child = subprocess.Popen(child_command(pending, results))
        current, began, seen, stopped = None, 0.0, 0, None
        while stopped is None:
            finished = child.poll() is not None  # polled before reading: no event can follow the last read
            events, seen = read_events(results, seen)
            for event in events:
                if event["event"] == "start":
                    current, began = event["section"], time.monotonic()
                else:
                    done[event["section"]], current = event["result"], None
            if finished:
                break
            if current and time.monotonic() - began > min(limits[current], deadline - began):
                child.kill()
                child.wait()
                stopped = f"stopped after {time.monotonic() - began:.0f} s, its time limit"
            time.sleep(0.2)
        os.unlink(results)
        if current is not None:
            done[current] = {"passed": False,
                             "error": stopped or f"the check process ended (status {child.returncode}) in it"}
        left = [name for name in pending if name not in done]
        if left == pending or time.monotonic() > deadline:
            why = "out of time" if time.monotonic() > deadline else f"status {child.returncode} before it began"
            done.update({name: {"passed": False, "error": f"not run: {why}"} for name in left})
            left = []
        pending = left
    return done


def install(wheels):
    """pip install --no-index from `wheels` of requirements.txt less torch (the machine's own is kept)."""
    requirements = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#") and not line.startswith("torch")]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(requirements) + "\n")
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "-r", f.name]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    os.unlink(f.name)
    imports = subprocess.run([sys.executable, "-c", "import models, networks, train, triton"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    checks = [check("pip install exit status", done.returncode, 0, done.returncode == 0),
              check("imports of models, networks, train, triton", imports.returncode, 0, imports.returncode == 0)]
    tail = (done.stdout + done.stderr).strip().splitlines()[-5:] + imports.stderr.strip().splitlines()[-3:]
    return section_result(checks, notes=[" ".join(command)] + tail)


def install_section(args):
    if not args.wheels:
        return section_result([], notes=[f"nothing installed ({'--smoke' if args.smoke else 'no --wheels'})"])
    try:
        return install(args.wheels)
    except Exception as error:  # a pip that hangs or cannot start: recorded, the sections still run
        return {"passed": False, "error": f"{type(error).__name__}: {error}"}


def machine(smoke):
    import torch

    text = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import triton
        text["triton"] = triton.__version__
    except ImportError:
        text["triton"] = "not installed"
    if not smoke:
        text.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return text


# ---------------------------------------------------------------------------------------------- reports

def cell(value):
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def verdict(passed):
    return {True: "pass", False: "FAIL", None: "recorded"}[passed]


def table(rows):
    keys = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(cell(row.get(key)) for key in keys) + " |" for row in rows]


def markdown(report):
    sections = report["sections"]
    lines = [f"# GPU check ({report['mode']}): {verdict(report['passed'])}", "",
             ", ".join(f"{k} {v}" for k, v in report["machine"].items()) + f"; {report['seconds']:.0f} s", "",
             "| section | result | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {verdict(s['passed'])} | {cell(s.get('seconds'))} |" for name, s in sections.items()]
    for name, s in sections.items():
        lines += ["", f"## {name}: {verdict(s['passed'])}", ""]
        if s.get("checks"):
            lines += table([{"check": c["name"], "value": c["value"], "target": c["target"],
                             "result": verdict(c["passed"])} for c in s["checks"]]) + [""]
        if s.get("rows"):
            lines += table(s["rows"]) + [""]
        lines += [f"- {note}" for note in s.get("notes", [])]
        if s.get("error"):
            lines += [f"**Error:** `{s['error']}`", "", "```", s.get("traceback", "").strip(), "```"]
    return "\n".join(lines).rstrip() + "\n"


def write_reports(report, prefix):
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# ------------------------------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="path prefix of the reports: PREFIX.json, PREFIX.md")
    parser.add_argument("--wheels", help="folder of wheels for requirements.txt less torch (installed offline)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton's interpreter, no install")
    parser.add_argument("--backend", help="scan backend of the model sections (default triton; auto with --smoke)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported, here and in the children
    if args.child:
        return run_child(args.child.split(","), args.results, args.smoke, args.backend)
    started = time.monotonic()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; --smoke runs the check on the CPU")
    sections = {"install": install_section(args)}

    def child_command(names, results):
        flags = ["--smoke"] * args.smoke + (["--backend", args.backend] if args.backend else [])
        return [sys.executable, __file__, "--output", args.output, "--child", ",".join(names), "--results", results,
                *flags]

    sections.update(run_sections(list(SECTIONS), child_command, LIMITS, started + TOTAL_SECONDS))
    report = {"mode": "smoke (CPU, interpreter)" if args.smoke else "gpu", "machine": machine(args.smoke),
              "passed": all(s["passed"] is not False for s in sections.values()),
              "seconds": time.monotonic() - started, "sections": sections}
    paths = write_reports(report, args.output)
    print(f"gpu_check: {verdict(report['passed'])}; reports {paths[0]} and {paths[1]}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
