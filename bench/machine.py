"""The machine a benchmark ran on, in one line, for the benchmark scripts (never imported by the product)."""
import os
import platform


def _proc_field(path, key):
    with open(path) as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)


def describe(device="cpu"):
    """CPU model and logical CPUs, RAM, Python, torch (and its threads), numba where installed, the GPU on a
    CUDA device, and the load average now (these machines are shared: it says how quiet the run was)."""
    import torch

    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU"
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = (f"{os.cpu_count()} logical CPUs ({cpu}), {memory_gib:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    try:
        import numba
        text += f", numba {numba.__version__} ({numba.get_num_threads()} threads)"
    except ImportError:
        pass
    if str(device).startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{text}; load average (1/5/15 min) {load}"
