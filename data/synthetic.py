"""Synthetic abdominal CT phantoms: a small, learnable data set that exercises the whole data path.

Each case is an elliptic body (air outside, subcutaneous fat, soft tissue, a vertebra) holding 8 organs
placed in patient (RAS, mm) coordinates, with random sizes, offsets and a smooth deformation per case.
Volumes are stored with anisotropic voxels and an LPS-like (non-RAS) affine with an origin offset, so
that orientation, resampling and inversion all do real work.
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from core.errors import DataConfigError
from core.fileio import current_umask

LABELS = {
    0: "background",
    1: "spleen",
    2: "right_kidney",
    3: "left_kidney",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "aorta",
    8: "pancreas",
}

SHAPE = (96, 96, 40)  # voxels; the 14 default cases take a few seconds
SPACING = (1.0, 1.0, 2.5)  # mm, thick slices as in clinical CT
BODY_RADII = (44.0, 34.0)  # mm, left-right and anterior-posterior semi-axes of the body
FAT_THICKNESS = 4.0  # mm of subcutaneous fat

# Portal-venous phase CT (the phase of BTCV/Synapse), where the parenchymal organs enhance above the
# unenhanced soft tissue; this also keeps each organ apart from its neighbours at 10-15 HU of noise.
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft_tissue": 45.0,  # muscle and bowel wall
    "bone": 500.0,
    "spleen": 120.0,
    "kidney": 170.0,  # enhancing cortex
    "gallbladder": 5.0,  # bile, not enhancing
    "liver": 105.0,
    "stomach": 15.0,  # fluid content; an air cap is added on top
    "aorta": 200.0,
    "pancreas": 85.0,
}

# label, HU key, centre (RAS mm: x towards patient right, y anterior, z superior), semi-axes (mm).
# Later organs are drawn over earlier ones (the gallbladder sits in a notch of the liver).
ORGANS = [
    (5, "liver", (16.0, 2.0, 16.0), (20.0, 18.0, 24.0)),
    (4, "gallbladder", (12.0, 15.0, -4.0), (7.0, 6.5, 9.0)),
    (1, "spleen", (-27.0, -10.0, 20.0), (9.0, 7.0, 14.0)),
    (6, "stomach", (-12.0, 11.0, 16.0), (12.0, 9.0, 12.0)),
    (2, "kidney", (19.0, -17.0, -14.0), (7.0, 6.0, 13.0)),
    (3, "kidney", (-19.0, -17.0, -10.0), (7.0, 6.0, 13.0)),
    (8, "pancreas", (-4.0, -3.0, -6.0), (18.0, 6.5, 6.5)),
]
AORTA = (7, (-3.0, -16.0), 5.0)  # label, (x, y) centre of a vertical tube, radius, all mm
SPINE = ((0.0, -27.0), 7.0)  # vertebral body behind the aorta


def _affine(shape, spacing, origin_shift):
    """LPS-like voxel->RAS affine: voxel axes 0 and 1 run towards patient left and posterior."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    centre = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre + origin_shift
    return affine


def _world_grid(shape, affine):
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return (affine[:3, :3].astype(np.float32) @ idx + affine[:3, 3:4].astype(np.float32)).reshape((3,) + shape)


def _smooth_field(rng, world, amplitude, wavelength=(40.0, 90.0), waves=4):
    """Smooth random displacement (3, ...) in mm: a sum of `waves` random plane waves per axis, with
    wavelengths in mm drawn from `wavelength`, scaled to an RMS of `amplitude`."""
    field = np.zeros_like(world)
    for axis in range(3):
        for _ in range(waves):
            k = rng.standard_normal(3)
            k *= 2 * np.pi / (np.linalg.norm(k) * rng.uniform(*wavelength))
            phase = rng.uniform(0.0, 2 * np.pi)
            field[axis] += np.sin(np.tensordot(k, world, axes=1) + phase)
    return field * (amplitude / np.sqrt(waves / 2.0))


def make_case(rng, shape=SHAPE, spacing=SPACING):
    """One phantom: (image int16 HU, label uint8, affine). Patient-frame centre is the world origin shift."""
    origin_shift = rng.uniform(-5.0, 5.0, 3)
    affine = _affine(shape, spacing, origin_shift)
    world = _world_grid(shape, affine) - origin_shift[:, None, None, None]
    # Warp space with a smooth random field so organ shapes vary beyond ellipsoids.
    world = world + _smooth_field(rng, world, amplitude=2.0)
    x, y, z = world

    image = np.full(shape, HU["air"])
    label = np.zeros(shape, np.uint8)
    bx, by = np.array(BODY_RADII) * rng.uniform(0.93, 1.05, 2)
    body = (x / bx) ** 2 + (y / by) ** 2
    image[body <= 1.0] = HU["fat"]
    inner = (x / (bx - FAT_THICKNESS)) ** 2 + (y / (by - FAT_THICKNESS)) ** 2 <= 1.0
    image[inner] = HU["soft_tissue"]
    (sx, sy), sr = SPINE
    image[(x - sx) ** 2 + (y - sy) ** 2 <= sr**2] = HU["bone"]

    hu = {k: v + rng.normal(0.0, 5.0) for k, v in HU.items() if k not in ("air", "fat", "bone")}
    for value, hu_key, centre, radii in ORGANS:
        c = np.array(centre) + rng.uniform(-3.0, 3.0, 3)
        r = np.array(radii) * rng.uniform(0.85, 1.15, 3)
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        if hu_key == "pancreas":
            dy = dy - 0.02 * dx**2  # curved body-tail, bending posteriorly away from the head
        q = (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + (dz / r[2]) ** 2
        # A thin fat plane around each organ, as between real abdominal viscera.
        image[(q > 1.0) & (q <= 1.25) & (label == 0) & inner] = HU["fat"]
        mask = (q <= 1.0) & inner
        image[mask] = hu[hu_key]
        label[mask] = value
        if hu_key == "stomach":
            image[mask & (dy > 0.55 * r[1])] = HU["air"]  # gas rises to the anterior wall (supine patient)
    value, (ax, ay), ar = AORTA
    mask = ((x - ax) ** 2 + (y - ay) ** 2 <= (ar * rng.uniform(0.9, 1.1)) ** 2) & inner
    image[mask] = hu["aorta"]
    label[mask] = value

    # Scanner blur (partial volume) then quantum noise.
    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.3))
    image += rng.normal(0.0, rng.uniform(10.0, 15.0), shape)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label, affine


def _save(array, affine, path):
    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def generate_synthetic_dataset(out_dir, n_train=8, n_val=2, n_test=4, seed=0):
    """Write n_train + n_val + n_test phantoms and dataset.json into out_dir; deterministic in `seed`.

    Training and validation cases go to imagesTr/labelsTr, test cases (with labels) to imagesTs/labelsTs.
    Returns the path of dataset.json.
    """
    out_dir = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    children = np.random.SeedSequence(seed).spawn(n_train + n_val + n_test)
    lists = {"training": [], "validation": [], "test": []}
    for i, child in enumerate(children):
        split = "training" if i < n_train else "validation" if i < n_train + n_val else "test"
        folder = "Ts" if split == "test" else "Tr"
        image, label, affine = make_case(np.random.default_rng(child))
        name = f"phantom_{i:03d}.nii.gz"
        _save(image, affine, out_dir / f"images{folder}" / name)
        _save(label, affine, out_dir / f"labels{folder}" / name)
        lists[split].append({"image": f"./images{folder}/{name}", "label": f"./labels{folder}/{name}"})
    content = {
        "name": "synthetic",
        "description": f"Synthetic abdominal CT phantoms (seed {seed})",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": n_train + n_val,
        "numTest": n_test,
        **lists,
    }
    json_path = out_dir / "dataset.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, json_path)
    return json_path


def ensure_synthetic_dataset(data_dir, **kwargs):
    """Generate the phantom set into data_dir unless its dataset.json exists; returns the dataset.json path.
    data_dir must be empty or absent otherwise (DataConfigError).

    Generation happens in a sibling temporary folder renamed into place, so an interrupted run leaves no
    half-written data set, and concurrent callers (e.g. several DDP ranks) end with one complete copy.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    json_path = data_dir / "dataset.json"
    if json_path.is_file():
        return json_path
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        # A mistyped data_dir must not fill someone's folder with phantoms.
        raise DataConfigError(f"data.data_dir {data_dir} is not empty and holds no dataset.json; synthetic "
                              "phantoms are generated only into an empty or absent folder")
    print(f"generating the synthetic phantom data set into {data_dir}", file=sys.stderr)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.", dir=data_dir.parent))
    try:
        generate_synthetic_dataset(tmp, **kwargs)
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the data set from the group
        if data_dir.is_dir() and not any(data_dir.iterdir()):
            data_dir.rmdir()
        try:
            os.rename(tmp, data_dir)
        except OSError:
            if not json_path.is_file():
                raise DataConfigError(
                    f"{data_dir} exists without dataset.json; remove it or point data.data_dir elsewhere"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json_path


def ensure_for(d):
    """Generate the phantoms where the data section `d` names the synthetic set (data.name: synthetic) and
    its folder has none yet: the commands that train on it need no download."""
    if d["name"] == "synthetic":
        ensure_synthetic_dataset(d["data_dir"])
