"""Peak resident memory of this process on Linux, for the benchmark scripts (never imported by the product)."""


def status_kb(key):
    """A /proc/self/status field in kB, e.g. VmRSS (now) or VmHWM (peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss():
    """Restart VmHWM from the current RSS (Linux clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
