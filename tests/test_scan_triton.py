"""The triton backend (blocks/scan_triton.py, blocks/causal_conv_triton.py) against float64 references:
the scan's output and the gradient of every input, float16/bfloat16 inputs, the causal convolution,
EM-Net's CSR-Mamba layer against the numba backend; the backend choice; every kernel compiled for a GPU;
and bench/gpu_check.py: its CPU smoke run, and a crashing or hanging section that the rest outlives.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before
triton is first imported). Shapes stay small (the interpreter runs each program in Python): chunks of
16 steps instead of 128, so that L = 45 crosses two chunk boundaries and ends inside a third, and D = 5
is no multiple of BLOCK_D.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton, Linux only)")
import triton.language as tl  # noqa: E402
from test_fast_paths import reference_causal_conv1d_silu  # noqa: E402
from test_selective_scan import make_inputs, reference  # noqa: E402

import blocks.selective_scan as ss  # noqa: E402
from blocks import causal_conv_triton, scan_cuda, scan_triton, triton_support  # noqa: E402
from models.layers import CSRMambaLayer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)
INTERPRET = not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"
if INTERPRET and not triton_support.is_interpreted(scan_triton._forward_kernel):
    pytest.skip("no CUDA, and triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it)",
                allow_module_level=True)
if INTERPRET:
    triton_support.speed_up_interpreter()


@triton.jit
def _scan_kernel(a_ptr, b_ptr, out_ptr, REVERSE: tl.constexpr):
    """The scans of the kernels (h -> a h + b along the last axis) on one (2, 4, 8) tile."""
    offs = tl.arange(0, 2)[:, None, None] * 32 + tl.arange(0, 4)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    _, h = tl.associative_scan((tl.load(a_ptr + offs), tl.load(b_ptr + offs)), 2, scan_triton._affine,
                               reverse=REVERSE)
    tl.store(out_ptr + offs, h)


@pytest.fixture
def small_tiles(monkeypatch):
    # Fewer, wider programs: the interpreter's cost is per program and per operation, not per element.
    monkeypatch.setattr(scan_triton, "CHUNK", 16)
    monkeypatch.setattr(scan_triton, "BLOCK_D", 4)


def scale_tolerance(expected, rtol):
    """rtol elementwise, plus rtol times the tensor's largest magnitude for entries near zero."""
    return dict(rtol=rtol, atol=rtol * expected.abs().max().item())


def scan_and_gradients(inputs, softplus, weight):
    leaves = {k: v.detach().to(DEVICE).requires_grad_() for k, v in inputs.items()}
    y = scan_triton.selective_scan_triton(**leaves, delta_softplus=softplus)
    (y * weight.to(DEVICE, y.dtype)).sum().backward()
    return y.detach().cpu(), {k: v.grad.cpu() for k, v in leaves.items()}


def reference_and_gradients(inputs, softplus, weight):
    leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    y = reference(**leaves, delta_softplus=softplus)
    (y * weight.double()).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


# The backward's channel groups: at 1024 programs one block of channels each (2 groups of 4 channels for
# D = 5), at 12 with 3 blocks of 2 channels, 2 groups of 2 blocks, the second holding channel 4 and a block
# past D; its dB and dC sum over blocks in registers.
@pytest.mark.parametrize("nstate, extras, softplus, block_d, programs", [
    (16, True, True, 4, 1024), (1, False, False, 2, 12)])
def test_float32_output_and_every_gradient_match_float64(small_tiles, monkeypatch, nstate, extras, softplus,
                                                         block_d, programs):
    monkeypatch.setattr(scan_triton, "BLOCK_D", block_d)
    monkeypatch.setattr(scan_triton, "BACKWARD_PROGRAMS", programs)
    inputs = make_inputs(batch=2, dim=5, nstate=nstate, length=45, dtype=torch.float32, extras=extras)
    weight = torch.randn(2, 5, 45, generator=torch.Generator().manual_seed(1))
    y, grads = scan_and_gradients(inputs, softplus, weight)
    y_ref, grads_ref = reference_and_gradients(inputs, softplus, weight)
    assert y.dtype == torch.float32 and set(grads) == set(inputs)
    torch.testing.assert_close(y.double(), y_ref, **scale_tolerance(y_ref, 1e-4))
    for name in inputs:
        assert grads[name].dtype == torch.float32, name
        torch.testing.assert_close(grads[name].double(), grads_ref[name], **scale_tolerance(grads_ref[name], 1e-4),
                                   msg=name)


# Inputs as autocast hands them over: activations in half precision, parameters (A, D, delta_bias) float32.
# The tolerance is the half type's rounding of stored results (2^-11 float16, 2^-8 bfloat16) times 4:
# the reference gets the same rounded inputs, so only the outputs' and gradients' own rounding differs.
@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_inputs_accumulate_in_float32(small_tiles, dtype, rtol):
    inputs = make_inputs(batch=2, dim=5, nstate=16, length=45, dtype=torch.float32)
    inputs = {k: v.to(dtype) if v.dim() == 3 else v for k, v in inputs.items()}
    weight = torch.randn(2, 5, 45, generator=torch.Generator().manual_seed(1)).to(dtype)
    y, grads = scan_and_gradients(inputs, True, weight)
    y_ref, grads_ref = reference_and_gradients(inputs, True, weight)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, **scale_tolerance(y_ref, rtol))
    for name in inputs:
        assert grads[name].dtype == inputs[name].dtype, name
        torch.testing.assert_close(grads[name].double(), grads_ref[name], **scale_tolerance(grads_ref[name], rtol),
                                   msg=name)


def test_forward_saves_the_inputs_and_the_chunk_start_states_only(small_tiles):
    batch, dim, nstate, length = 1, 4, 16, 64
    inputs = {k: v.to(DEVICE).requires_grad_() for k, v in
              make_inputs(batch, dim, nstate, length, dtype=torch.float32).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        scan_triton.selective_scan_triton(**inputs, delta_softplus=True)
    chunk_states = batch * dim * (length // 16) * nstate * 4
    assert sum(saved) == sum(t.numel() * 4 for t in inputs.values()) + chunk_states


def test_interpreter_scan_speed_up_keeps_triton_scan_order():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 4, 8, dtype=torch.float64, generator=g)
    b = torch.randn(2, 4, 8, dtype=torch.float64, generator=g)
    for reverse in (False, True):
        out = torch.empty_like(a).to(DEVICE)
        _scan_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), out, reverse)
        h, expected = torch.zeros(2, 4, dtype=torch.float64), torch.empty_like(a)
        for t in (range(7, -1, -1) if reverse else range(8)):
            h = a[..., t] * h + b[..., t]
            expected[..., t] = h
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width, bias, channels_last, dtype, rtol", [
    (4, True, True, torch.float32, 1e-5), (3, False, False, torch.float32, 1e-5), (4, True, True, torch.float16, 4e-3)])
def test_causal_conv_matches_float64_depthwise_conv(width, bias, channels_last, dtype, rtol):
    g = torch.Generator().manual_seed(0)
    # 70 steps, 37 channels: no multiple of the programs' tiles (64 x 32 forward, 32 x 16 backward).
    x = torch.randn(2, 70, 2 * 37, generator=g).transpose(1, 2)[:, :37] if channels_last else \
        torch.randn(2, 37, 70, generator=g)
    weight = torch.randn(37, 1, width, generator=g)
    bias_t = torch.randn(37, generator=g) if bias else None
    inputs = [x.to(dtype), weight, bias_t]
    upstream = torch.randn(2, 37, 70, generator=g).to(dtype)
    ours = [None if t is None else t.to(DEVICE).requires_grad_() for t in inputs]
    out = causal_conv_triton.causal_conv1d_silu_triton(*ours)
    assert out.dtype == dtype and out.is_contiguous()
    grads = torch.autograd.grad(out, [t for t in ours if t is not None], upstream.to(DEVICE))
    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    expected = reference_causal_conv1d_silu(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, [t for t in ref_inputs if t is not None], upstream.double())
    torch.testing.assert_close(out.cpu().double(), expected, **scale_tolerance(expected, rtol))
    for got, want, given in zip(grads, expected_grads, [t for t in inputs if t is not None]):
        assert got.dtype == given.dtype
        torch.testing.assert_close(got.cpu().double(), want, **scale_tolerance(want, rtol))


def layer_outputs_and_gradients(layer, x, backend):
    ss.set_scan_backend(backend)
    try:
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        (out * torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)).sum().backward()
    finally:
        ss.set_scan_backend("auto")
    return out.detach().cpu(), [leaf.grad.cpu()] + [p.grad.cpu() for p in layer.parameters()]


@pytest.mark.skipif(INTERPRET and "numba" not in ss.available_scan_backends(), reason="needs numba")
def test_csr_mamba_layer_with_triton_matches_numba(small_tiles, monkeypatch):
    monkeypatch.setattr(scan_triton, "BLOCK_D", 8)
    torch.manual_seed(0)
    layer = CSRMambaLayer(dim=8, num_tokens=4 * 4 * 2).eval()  # eval: no dropout, fixed BatchNorm statistics
    layer.gamma.data.fill_(0.5)  # a visible Mamba branch (the initial 1e-6 hides it behind the residual)
    x = torch.randn(1, 8, 4, 4, 2)  # 32 tokens: 2 chunks; inner width 16: 2 channel blocks
    expected, expected_grads = layer_outputs_and_gradients(layer, x, "numba")
    out, grads = layer_outputs_and_gradients(layer.to(DEVICE), x.to(DEVICE), "triton")
    torch.testing.assert_close(out, expected, **scale_tolerance(expected, 1e-4))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **scale_tolerance(want, 1e-4))


def test_backend_choice_and_one_line_errors(monkeypatch):
    assert ss.scan_backend_for(torch.zeros(1)) == ("numba" if "numba" in ss.available_scan_backends() else "torch")
    monkeypatch.setenv(ss.ENV_VAR, "triton")
    assert ss.forced_scan_backend() == "triton"
    inputs = {k: v.to(DEVICE) for k, v in make_inputs(batch=1, dim=2, nstate=2, length=5).items()}  # float64
    with pytest.raises(ValueError, match="^scan backend 'triton' cannot run these inputs: it does not support float64"):
        ss.selective_scan(**inputs)
    monkeypatch.setattr(scan_triton, "triton_unavailable_reason", lambda device=None: "triton is not installed")
    with pytest.raises(ValueError, match="^scan backend 'triton' from set_scan_backend is not available here: "
                                         "triton is not installed"):
        ss.set_scan_backend("triton")
    assert ss.get_scan_backend() == "auto"


def test_gpu_check_smoke_run_writes_both_reports(tmp_path):
    # Kept small on purpose (tiny shapes, one step each): about 30 s on 2 idle cores.
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--output",
                             str(tmp_path / "check")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert list(report["sections"]) == ["install", *gpu_check.SECTIONS]
    failed = {name: s.get("error") for name, s in report["sections"].items() if s["passed"] is False}
    assert not failed and report["passed"]
    scan = report["sections"]["scan"]
    assert [row["shape"] for row in scan["rows"]] == ["L 40", "stage-like"]
    assert all(row["triton vs torch error"] < 1e-3 and row["triton reproducible"] for row in scan["rows"])
    assert [row["model"] for row in report["sections"]["models"]["rows"]] == ["em-net", "swin_unetr"]
    assert report["sections"]["inference"]["checks"][0]["value"] >= 0.99
    markdown = (tmp_path / "check.md").read_text()
    assert markdown.startswith("# GPU check (smoke (CPU, interpreter)): pass")
    assert all(f"## {name}: " in markdown for name in report["sections"])


FAKE_CHILD = """
import json, os, sys, time
names, results = sys.argv[1].split(","), sys.argv[2]
for name in names:
    with open(results, "a") as f:
        f.write(json.dumps({"section": name, "event": "start"}) + "\\n")
    if name == "crash":
        os._exit(7)
    if name == "hang":
        time.sleep(60)
    with open(results, "a") as f:
        f.write(json.dumps({"section": name, "event": "end", "result": {"passed": name != "fail"}}) + "\\n")
"""


def test_gpu_check_goes_on_after_a_crashing_or_hanging_section():
    names = ["a", "crash", "b", "hang", "fail", "c"]
    done = gpu_check.run_sections(names, lambda pending, path: [sys.executable, "-c", FAKE_CHILD, ",".join(pending),
                                                                path], dict.fromkeys(names, 3), time.monotonic() + 60)
    assert list(done) == ["a", "crash", "b", "hang", "fail", "c"]
    assert done["a"]["passed"] and done["b"]["passed"] and done["c"]["passed"] and done["fail"]["passed"] is False
    assert "ended (status 7)" in done["crash"]["error"] and "time limit" in done["hang"]["error"]


@pytest.mark.parametrize("kernel_built", [True, False])
def test_mamba_ssm_counts_only_with_its_compiled_scan(monkeypatch, kernel_built):
    # A stand-in mamba-ssm: newer releases install without selective_scan_cuda unless asked for it.
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = object()
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda") if kernel_built
                        else None)  # None in sys.modules: the import fails
    scan_cuda._kernel.cache_clear()
    try:
        assert (scan_cuda._kernel() is interface.selective_scan_fn) == kernel_built
    finally:
        scan_cuda._kernel.cache_clear()


def test_every_kernel_compiles_for_a_gpu():
    # Triton's compiler and the ptxas it ships build the kernels for sm_90 without a GPU: the compiled path,
    # which the interpreter does not take. Without TRITON_INTERPRET, in a process of its own.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "compile_triton_kernels.py")], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| scan") or
            line.startswith("| c")]
    assert len(rows) == 13 and all(row[3].isdigit() for row in rows), result.stdout
