"""Selective-scan backends against a float64 sequential reference written here."""
import pytest
import torch
import torch.nn.functional as F

import blocks.selective_scan as ss
from blocks import scan_numba, scan_torch

# triton: float32 kernels with tests of their own (tests/test_scan_triton.py)
CPU_BACKENDS = [name for name in ss.available_scan_backends() if name not in ("cuda", "triton")]


def reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence step by step in float64, as written in the mamba-ssm paper."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y


def make_inputs(batch=2, dim=3, nstate=4, length=150, dtype=torch.float64, extras=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    # delta + delta_bias >= 0 keeps exp(delta A) <= 1 without softplus, as in a trained model.
    inputs = {"u": rand(batch, dim, length),
              "delta": 0.5 * torch.rand(batch, dim, length, generator=g, dtype=dtype),
              "A": -torch.rand(dim, nstate, generator=g, dtype=dtype) * 4,
              "B": rand(batch, nstate, length), "C": rand(batch, nstate, length)}
    if extras:
        delta_bias = 0.2 * torch.rand(dim, generator=g, dtype=dtype)
        inputs.update(D=rand(dim), z=rand(batch, dim, length), delta_bias=delta_bias)
    return inputs


@pytest.fixture
def backend(request):
    ss.set_scan_backend(request.param)
    yield request.param
    ss.set_scan_backend("auto")


@pytest.fixture
def small_chunks(monkeypatch):
    # Chunks of 4 let tiny gradcheck sizes cross several chunk boundaries (L = 11 is no multiple).
    monkeypatch.setattr(scan_torch, "CHUNK", 4)
    monkeypatch.setattr(scan_numba, "CHUNK", 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("softplus,extras", [(True, True), (False, False), (True, False), (False, True)])
def test_outputs_and_gradients_match_reference(backend, softplus, extras):
    inputs = make_inputs(extras=extras)
    ours = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = ss.selective_scan(**ours, delta_softplus=softplus)
    y_ref = reference(**ref, delta_softplus=softplus)
    assert y.shape == (2, 3, 150) and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y * weight).sum().backward()
    (y_ref * weight).sum().backward()
    for name in inputs:
        torch.testing.assert_close(ours[name].grad, ref[name].grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("softplus", [True, False])
def test_gradcheck_all_inputs(backend, small_chunks, softplus):
    inputs = make_inputs(batch=2, dim=2, nstate=3, length=11)
    names = list(inputs)
    tensors = [inputs[k].requires_grad_() for k in names]

    def fn(*args):
        return ss.selective_scan(**dict(zip(names, args)), delta_softplus=softplus)

    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_float32_is_accurate(backend):
    inputs = make_inputs(batch=1, dim=4, nstate=16, length=300, dtype=torch.float32)
    y = ss.selective_scan(**inputs, delta_softplus=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(**inputs, delta_softplus=True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_autocast_runs_in_float32(backend):
    inputs = make_inputs(batch=1, dim=4, nstate=8, length=100, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ss.selective_scan(**inputs, delta_softplus=True)
        y_half = ss.selective_scan(**{**inputs, "u": inputs["u"].bfloat16()}, delta_softplus=True)
    assert y.dtype == torch.float32 and y_half.dtype == torch.bfloat16
    expected = reference(**inputs, delta_softplus=True)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_saved_memory_does_not_scale_with_states(backend):
    batch, dim, nstate, length = 1, 8, 16, 1024
    inputs = {k: v.float().requires_grad_() for k, v in
              make_inputs(batch, dim, nstate, length, extras=False).items()}
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ss.selective_scan(**inputs, delta_softplus=True)
    all_states = batch * dim * length * nstate * 4
    assert sum(saved) < all_states / 2
    y.sum().backward()
    assert inputs["B"].grad.shape == (batch, nstate, length)


def test_backend_selection_and_errors(monkeypatch):
    cpu = torch.zeros(1)
    assert ss.scan_backend_for(cpu) == ("numba" if "numba" in CPU_BACKENDS else "torch")
    assert ss.scan_backend_for(torch.zeros(1, device="meta")) == "torch"
    assert "torch" in ss.available_scan_backends()
    with pytest.raises(ValueError, match="unknown scan backend 'nope'.*torch"):
        ss.set_scan_backend("nope")
    if "cuda" not in ss.available_scan_backends():
        with pytest.raises(ValueError, match="'cuda'.*not available.*available: .*torch"):
            ss.set_scan_backend("cuda")
    assert ss.get_scan_backend() == "auto"

    calls = []
    original = scan_torch.scan
    monkeypatch.setattr(scan_torch, "scan", lambda *a, **k: calls.append(1) or original(*a, **k))
    inputs = make_inputs(batch=1, dim=2, nstate=2, length=5)
    monkeypatch.setenv(ss.ENV_VAR, "torch")
    ss.selective_scan(**inputs)
    assert calls == [1]
    monkeypatch.setenv(ss.ENV_VAR, "warp")
    with pytest.raises(ValueError, match="'warp' from EMNET_SCAN_BACKEND"):
        ss.selective_scan(**inputs)


def test_bad_shapes_name_the_argument():
    inputs = make_inputs(batch=1, dim=2, nstate=3, length=5)
    with pytest.raises(ValueError, match=r"B must have shape \(1, 3, 5\)"):
        ss.selective_scan(**{**inputs, "B": inputs["B"][:, :2]})
    with pytest.raises(ValueError, match="A must be"):
        ss.selective_scan(**{**inputs, "A": inputs["A"][0]})


@pytest.mark.skipif("cuda" not in ss.available_scan_backends(), reason="needs CUDA and mamba-ssm")
def test_cuda_backend_matches_reference():
    inputs = {k: v.float().cuda().requires_grad_() for k, v in make_inputs(length=300).items()}
    ss.set_scan_backend("cuda")
    try:
        y = ss.selective_scan(**inputs, delta_softplus=True)
        y.sum().backward()
    finally:
        ss.set_scan_backend("auto")
    cpu = {k: v.detach().cpu().double().requires_grad_() for k, v in inputs.items()}
    y_ref = reference(**cpu, delta_softplus=True)
    y_ref.sum().backward()
    torch.testing.assert_close(y.detach().cpu().double(), y_ref, rtol=1e-3, atol=1e-3)
    for name, tensor in inputs.items():
        torch.testing.assert_close(tensor.grad.cpu().double(), cpu[name].grad, rtol=1e-2, atol=1e-2, msg=name)


def test_backend_check_script_compares_outputs_and_gradients():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "check_scan_backends.py"
    args = ["--test", "torch", "--reference", "numba", "--lengths", "300", "--dim", "8"]
    ok = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "ddelta_bias" in ok.stdout and ok.stdout.rstrip().splitlines()[-1].startswith("OK")
    strict = subprocess.run([sys.executable, str(script), *args, "--tolerance", "1e-12"], capture_output=True,
                            text=True, timeout=300)
    assert strict.returncode == 1 and "FAILED" in strict.stdout  # float32 backends never agree to 1e-12


def test_the_public_import_path_is_the_same_scan():
    import models.selective_scan as public

    assert public.selective_scan is ss.selective_scan and public.set_scan_backend is ss.set_scan_backend
    assert public.BACKENDS == ss.BACKENDS and public.available_scan_backends is ss.available_scan_backends


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="needs numba")
def test_numba_sums_do_not_depend_on_the_thread_count():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba runs one thread here")
    inputs = make_inputs(batch=2, dim=24, nstate=8, length=200, dtype=torch.float32)
    ss.set_scan_backend("numba")
    threads = numba.get_num_threads()
    grads = []
    try:
        for count in (1, 2):
            numba.set_num_threads(count)
            ours = {k: v.clone().requires_grad_() for k, v in inputs.items()}
            ss.selective_scan(**ours, delta_softplus=True).pow(2).sum().backward()
            grads.append({k: v.grad for k, v in ours.items()})
    finally:
        numba.set_num_threads(threads)
        ss.set_scan_backend("auto")
    for name in inputs:  # bit for bit: the channel sums of dA, dB, dC, dD are added in one order
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="needs numba")
def test_numba_kernels_add_in_one_order_wherever_the_arrays_lie():
    # With reassociation, LLVM runs a loop that writes arrays and sums over N as a vectorised or a scalar copy,
    # chosen at run time by the arrays' addresses, and the two add in different orders: the result depended
    # on where the allocator put the buffers. Without it every sum over N is added in index order.
    inputs = make_inputs(batch=2, dim=8, nstate=16, length=70, dtype=torch.float32)
    ss.set_scan_backend("numba")
    try:
        ours = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        ss.selective_scan(**ours, delta_softplus=True).sum().backward()
    finally:
        ss.set_scan_backend("auto")
    for kernel in (scan_numba._numba_forward, scan_numba._numba_backward):
        code = "".join(kernel.inspect_llvm().values())
        assert "<16 x float>" in code or "<8 x float>" in code or "<4 x float>" in code  # still vectorised
        assert " reassoc " not in code and " fast " not in code, kernel.__name__
