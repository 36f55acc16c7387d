import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

import metrics

SPACING = (0.7, 1.3, 2.9)
# the direct MONAI calls below trip over MONAI's own deprecated argument
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")


def box(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def brute_hd95(a, b, spacing):
    """Float64 reference: surface = voxels with a 6-neighbour outside; max of directed 95th percentiles."""
    def surface(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing, dtype=np.float64)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


# ---- Dice -------------------------------------------------------------------------------------------

def test_dice_of_known_overlaps():
    shape = (12, 12, 12)
    a = box(shape, (2, 2, 2), (6, 6, 6))  # 64 voxels
    b = box(shape, (3, 2, 2), (7, 6, 6))  # shifted by 1: overlap 3*4*4 = 48
    assert metrics.dice(a, b) == pytest.approx(2 * 48 / 128)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, box(shape, (7, 7, 7), (9, 9, 9))) == 0.0
    c = box(shape, (2, 2, 2), (4, 6, 6))  # half of a: 2*32/(64+32)
    assert metrics.dice(c, a) == pytest.approx(2 / 3)


def test_dice_accepts_integer_masks_and_rejects_mismatch():
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    a[1:3, 1:3, 1:3] = 1
    assert metrics.dice(a, a.astype(bool)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(a, a[:3])


# ---- HD95 against hand-computed values ----------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_hd95_of_slabs_offset_by_k_voxels(axis, k):
    # two-voxel-thick slabs: every voxel is on the surface; half the distances are (k-1)*s, half k*s
    # (k >= 2) or all k*s (k = 1); the 95th percentile is k*s along the offset axis, in mm
    shape = (16, 16, 16)
    lo, hi = [3, 3, 3], [11, 11, 11]
    lo[axis], hi[axis] = 2, 4
    a = box(shape, lo, hi)
    lo[axis] += k
    hi[axis] += k
    b = box(shape, lo, hi)
    assert metrics.hd95(a, b, SPACING) == pytest.approx(k * SPACING[axis], rel=1e-6)
    assert metrics.hd95(b, a, SPACING) == pytest.approx(k * SPACING[axis], rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("n,k", [(2, 2), (3, 3), (3, 5), (4, 6)])
def test_hd95_of_cubes_offset_by_k_voxels(axis, n, k):
    # cubes of side n, offset by k >= n voxels: every surface voxel of one cube lies within k*s of the other
    # cube's facing layer, and the n^2 voxels of its far face (over 5% of the surface) lie exactly k*s away
    shape = (16, 16, 16)
    a = box(shape, (3, 3, 3), (3 + n, 3 + n, 3 + n))
    b = np.roll(a, k, axis=axis)
    assert metrics.hd95(a, b, SPACING) == pytest.approx(k * SPACING[axis], rel=1e-6)
    assert metrics.hd95(b, a, SPACING) == pytest.approx(k * SPACING[axis], rel=1e-6)


def test_hd95_of_single_voxels_is_their_distance_in_mm():
    shape = (10, 10, 10)
    a = box(shape, (1, 2, 3), (2, 3, 4))
    b = box(shape, (4, 6, 4), (5, 7, 5))  # offset (3, 4, 1) voxels
    expected = math.sqrt((3 * SPACING[0]) ** 2 + (4 * SPACING[1]) ** 2 + (1 * SPACING[2]) ** 2)
    assert metrics.hd95(a, b, SPACING) == pytest.approx(expected, rel=1e-6)


def test_hd95_is_the_95th_percentile_not_the_maximum():
    # a line of 19 voxels, and the same line plus one outlier at 10 voxels along axis 2: the directed
    # distances are 19 zeros and 10*s2; linear interpolation at 0.95*(20-1) = 18.05 gives 0.05 * 10*s2
    shape = (8, 24, 16)
    gt = box(shape, (3, 2, 3), (4, 21, 4))
    pred = gt.copy()
    pred[3, 11, 13] = True
    # MONAI interpolates in float32: 0.05 carries a relative error of ~2e-5
    assert metrics.hd95(pred, gt, SPACING) == pytest.approx(0.05 * 10 * SPACING[2], rel=1e-4)
    assert metrics.hd95(pred, gt, SPACING) < 0.1 * 10 * SPACING[2]  # far below the maximum, 29 mm


def test_hd95_of_offset_cubes_matches_float64_reference():
    shape = (14, 14, 14)
    a = box(shape, (2, 3, 3), (9, 9, 8))
    b = box(shape, (4, 3, 4), (11, 10, 9))
    assert metrics.hd95(a, b, SPACING) == pytest.approx(brute_hd95(a, b, SPACING), rel=1e-5)


def test_hd95_agrees_with_monai_on_random_blobs():
    rng = np.random.default_rng(0)
    shape = (20, 18, 16)
    for _ in range(4):
        blobs = [ndimage.gaussian_filter(rng.random(shape), 2.0) for _ in range(2)]
        a, b = (x > np.quantile(x, 0.8) for x in blobs)
        spacing = rng.uniform(0.5, 3.0, size=3)
        ours = metrics.hd95(a, b, spacing)
        ref = compute_hausdorff_distance(
            torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
            include_background=True, percentile=95, spacing=spacing.tolist(),
        ).item()
        assert ours == pytest.approx(ref, rel=1e-6)
        assert ours == pytest.approx(brute_hd95(a, b, spacing), rel=1e-5)
        assert ours > 0


# ---- the empty-mask rule ----------------------------------------------------------------------------

def test_both_empty_is_perfect():
    empty = np.zeros((5, 6, 7), dtype=bool)
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.hd95(empty, empty, SPACING) == 0.0


def test_exactly_one_empty_gets_zero_dice_and_the_image_diagonal():
    shape = (5, 6, 7)
    empty = np.zeros(shape, dtype=bool)
    some = box(shape, (1, 1, 1), (3, 3, 3))
    diagonal = math.sqrt((5 * 0.7) ** 2 + (6 * 1.3) ** 2 + (7 * 2.9) ** 2)
    for pred, gt in ((empty, some), (some, empty)):  # missed, then hallucinated
        assert metrics.dice(pred, gt) == 0.0
        value = metrics.hd95(pred, gt, SPACING)
        assert value == pytest.approx(diagonal)
        assert math.isfinite(value) and value > 0


def test_hd95_rejects_bad_spacing():
    a = box((4, 4, 4), (1, 1, 1), (2, 2, 2))
    for bad in ((1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0)):
        with pytest.raises(ValueError, match="spacing"):
            metrics.hd95(a, a, bad)


# ---- per-class ----------------------------------------------------------------------------------------

def test_per_class_metrics_on_label_volumes():
    shape = (12, 12, 12)
    gt = np.zeros(shape, dtype=np.int64)
    pred = np.zeros(shape, dtype=np.int64)
    gt[2:6, 2:6, 2:6] = 1
    pred[3:7, 2:6, 2:6] = 1  # class 1 shifted by one voxel along axis 0
    gt[8:10, 8:10, 8:10] = 2  # class 2 missed
    pred[0:2, 10:12, 0:2] = 3  # class 3 hallucinated; class 4 absent from both
    result = metrics.per_class_metrics(pred, gt, 5, SPACING)
    assert sorted(result) == [1, 2, 3, 4]
    assert result[1]["dice"] == pytest.approx(0.75)
    assert result[1]["hd95"] == pytest.approx(metrics.hd95(pred == 1, gt == 1, SPACING))
    assert result[1]["hd95"] == pytest.approx(brute_hd95(pred == 1, gt == 1, SPACING), rel=1e-5)
    diagonal = metrics.image_diagonal_mm(shape, SPACING)
    assert result[2] == {"dice": 0.0, "hd95": pytest.approx(diagonal)}
    assert result[3] == {"dice": 0.0, "hd95": pytest.approx(diagonal)}
    assert result[4] == {"dice": 1.0, "hd95": 0.0}


def test_cropping_to_the_foreground_changes_nothing_at_the_image_border():
    # masks touching the image faces: the cropped computation must equal MONAI on the full volume
    rng = np.random.default_rng(3)
    shape = (16, 14, 12)
    labels = [ndimage.median_filter(rng.integers(0, 4, size=shape), 3) for _ in range(2)]
    pred, gt = labels
    result = metrics.per_class_metrics(pred, gt, 4, SPACING)
    for c in (1, 2, 3):
        assert (pred == c)[0].any() or (gt == c)[-1].any()  # really at the border
        ref = compute_hausdorff_distance(
            torch.from_numpy(pred == c)[None, None], torch.from_numpy(gt == c)[None, None],
            include_background=True, percentile=95, spacing=list(SPACING),
        ).item()
        assert result[c]["hd95"] == pytest.approx(ref, rel=1e-6)
        overlap = ((pred == c) & (gt == c)).sum()
        assert result[c]["dice"] == pytest.approx(2 * overlap / ((pred == c).sum() + (gt == c).sum()))


def test_per_class_metrics_accepts_integral_float_labels_only():
    gt = np.zeros((6, 6, 6))
    gt[1:3, 1:3, 1:3] = 1.0
    assert metrics.per_class_metrics(gt, gt, 2, SPACING) == {1: {"dice": 1.0, "hd95": 0.0}}
    with pytest.raises(ValueError, match="integer class labels"):
        metrics.per_class_metrics(gt + 0.5, gt, 2, SPACING)
