"""Data loaders for training, evaluation and prediction (MONAI CacheDataset + DataLoader)."""
from pathlib import Path

from monai.data import CacheDataset, DataLoader, Dataset
from torch.utils.data import DistributedSampler

from .datalist import DataConfigError, read_datalist
from .transforms import eval_transforms, train_transforms


def _dataset(cfg, items, transform, progress):
    d = cfg["data"]
    return CacheDataset(
        data=items,
        transform=transform,
        cache_rate=d["cache_rate"],
        num_workers=d["num_workers"],
        progress=progress,
    )


def make_train_loader(cfg, rank=0, world_size=1):
    """Shuffled loader of random crops; each batch holds trainer.batch_size volumes x data.num_samples crops.

    With world_size > 1 it uses a DistributedSampler: call loader.sampler.set_epoch(epoch) each epoch.
    """
    items = read_datalist(cfg)["training"]
    dataset = _dataset(cfg, items, train_transforms(cfg), progress=rank == 0)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg["trainer"]["seed"])
    return DataLoader(
        dataset,
        batch_size=cfg["trainer"]["batch_size"],
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg["data"]["num_workers"],
        drop_last=False,
    )


def make_eval_loader(cfg, split):
    """Whole preprocessed volumes of `split` ("validation" or "test"), batch 1, with labels when all have one."""
    if split not in ("validation", "test"):
        raise DataConfigError(f"split must be 'validation' or 'test', got {split!r}")
    items = read_datalist(cfg)[split]
    if not items:
        raise DataConfigError(f"{cfg['data']['data_dir']}: the {split!r} list is empty")
    with_label = all("label" in e for e in items)
    if not with_label:
        items = [{"image": e["image"]} for e in items]
    return DataLoader(
        _dataset(cfg, items, eval_transforms(cfg, with_label=with_label), progress=False),
        batch_size=1,
        shuffle=False,
        num_workers=cfg["data"]["num_workers"],
    )


def make_predict_loader(cfg, image_paths):
    """Loader of unlabelled images (batch 1), preprocessed like evaluation; not cached, each is read once."""
    items = []
    for p in image_paths:
        path = Path(p).expanduser().resolve()
        if not path.is_file():
            raise DataConfigError(f"image file not found: {path}")
        items.append({"image": str(path)})
    if not items:
        raise DataConfigError("no image paths given to predict")
    return DataLoader(
        Dataset(items, transform=eval_transforms(cfg, with_label=False)),
        batch_size=1,
        shuffle=False,
        num_workers=cfg["data"]["num_workers"],
    )
