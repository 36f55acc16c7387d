"""Model cost: parameters and forward FLOPs.

torch's FlopCounterMode counts convolutions and matrix products (2 FLOPs per multiply-add). The selective
scan runs outside aten (numba, or mamba-ssm's kernel), so it is counted from its shapes with Mamba's own
formula. Element-wise work (norms, activations, FFTs) is not counted. calflops, the tool of the paper's
table, is an optional second counter (it imports transformers).
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

from blocks.mamba import ScanDirection


def selective_scan_flops(batch, dim, length, d_state, with_D=True, with_z=True):
    """FLOPs of one selective scan as mamba-ssm counts them: 9 per state element and step (discretise,
    update, read out), plus one per element for the D skip and one for the z gate."""
    flops = 9 * batch * dim * length * d_state
    return flops + (batch * dim * length) * (int(with_D) + int(with_z))


def count_flops(model, example_input):
    """{"params", "flops", "macs", "scan_flops"} for one forward pass of `model` on `example_input`.

    "flops" includes the scans; "macs" are the multiply-adds of convolutions and matrix products.
    """
    scan_flops = conv_flops = 0

    def count_scan(module, inputs, output):
        nonlocal scan_flops, conv_flops
        batch, dim, length = inputs[0].shape
        scan_flops += selective_scan_flops(batch, dim, length, module.d_state)
        # The causal depthwise convolution runs as per-tap multiply-adds (or causal-conv1d's kernel), which
        # FlopCounterMode does not see: counted as the convolution padded on both sides that it replaced.
        width = module.conv1d.weight.shape[-1]
        conv_flops += 2 * batch * dim * (length + width - 1) * width

    hooks = [m.register_forward_hook(count_scan) for m in model.modules() if isinstance(m, ScanDirection)]
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    dense = counter.get_total_flops() + conv_flops
    return {"params": sum(p.numel() for p in model.parameters()), "flops": dense + scan_flops,
            "macs": dense // 2, "scan_flops": scan_flops}


def calflops_counts(model, example_input):
    """{"calflops_flops", "calflops_macs"} of one forward pass, as calflops (the paper's tool) counts them.

    calflops patches torch's functional ops, so it cannot see the selective scans (numba or CUDA kernels)
    but does count element-wise work (norms, activations) that `count_flops` leaves out. ImportError
    when calflops, or the transformers package it imports, is missing."""
    from calflops import calculate_flops

    with torch.no_grad():
        flops, macs, _ = calculate_flops(model=model, args=[example_input], print_results=False,
                                         print_detailed=False, output_as_string=False)
    return {"calflops_flops": int(flops), "calflops_macs": int(macs)}
