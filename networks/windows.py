"""The check every baseline builder makes of its training window (roi_size)."""


def check_roi_size(network, roi_size, multiple, minimum, why_minimum):
    """roi_size (an int or 3 ints) as a tuple of 3 ints, each a multiple of `multiple` and at least
    `minimum`; otherwise a ValueError naming the network, the value and the reason."""
    sizes = [roi_size] * 3 if isinstance(roi_size, int) else list(roi_size)
    if len(sizes) != 3 or any(isinstance(s, bool) or not isinstance(s, int) for s in sizes):
        raise ValueError(f"{network} roi_size must be 3 integer sizes, got {roi_size!r}")
    if any(s % multiple for s in sizes):
        raise ValueError(f"{network} roi_size {sizes} must be divisible by {multiple} (its total downsampling)")
    if any(s < minimum for s in sizes):
        raise ValueError(f"{network} roi_size {sizes} must be at least {minimum} per side ({why_minimum})")
    return tuple(sizes)
