"""The check every network builder makes of its training window (roi_size)."""
import math


def check_roi_size(network, roi_size, multiple, coarsest_voxels=1, why=""):
    """roi_size (an int or 3 ints) as a tuple of 3 ints, each side a multiple of `multiple` (the network's
    total downsampling), leaving at least `coarsest_voxels` voxels on the coarsest feature map (`why`);
    otherwise a ValueError naming the network, the value and the reason."""
    sizes = [roi_size] * 3 if isinstance(roi_size, int) else list(roi_size)
    if len(sizes) != 3 or any(isinstance(s, bool) or not isinstance(s, int) for s in sizes):
        raise ValueError(f"{network} roi_size must be 3 integer sizes, got {roi_size!r}")
    if any(s <= 0 or s % multiple for s in sizes):
        raise ValueError(f"{network} roi_size {sizes} must be positive and divisible by {multiple} "
                         "(its total downsampling)")
    coarsest = math.prod(s // multiple for s in sizes)
    if coarsest < coarsest_voxels:
        raise ValueError(f"{network} roi_size {sizes} leaves {coarsest} voxel on the coarsest feature map "
                         f"(1/{multiple} of the window); it needs at least {coarsest_voxels}: {why}")
    return tuple(sizes)
