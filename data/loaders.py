"""Data loaders for training, evaluation and prediction (MONAI CacheDataset + DataLoader).

The training loader draws reproducibly from any point: the case order of data pass p is a permutation
seeded by (seed, p), and the random augmentation of the item at (pass, position) is seeded by
(seed, rank, pass, position) just before it runs. Every draw is thus a function of where it sits in the
stream, not of a running random state, so a run resumed at optimizer step k continues exactly as it
would have, with any number of loader workers (see `TrainSampler` and `SeededDraws`).
"""
import signal
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from torch.utils.data import Sampler

from core.errors import DataConfigError

from .datalist import read_datalist
from .transforms import eval_transforms, train_transforms


def _dataset(d, items, transform, progress):
    return CacheDataset(
        data=items,
        transform=transform,
        cache_rate=d["cache_rate"],
        num_workers=d["num_workers"],
        progress=progress,
    )


def derived_seed(*numbers):
    """A 32-bit seed that depends on every number given (numpy's SeedSequence mixes them)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])


class TrainSampler(Sampler):
    """Shuffled training order that can start anywhere: pass p visits the cases in a permutation seeded by
    (seed, p); with several processes each rank takes every world_size-th case of it (the order padded with
    its own start to a multiple of world_size, as DistributedSampler does).

    Yields (pass, position, case index) keys for `SeededDraws`. `start(p, position)` sets where the next
    iteration begins; each later iteration is the next pass, from position 0. len() is a whole pass.
    """

    def __init__(self, num_cases, seed, rank=0, world_size=1):
        self.num_cases, self.seed, self.rank, self.world_size = num_cases, seed, rank, world_size
        self.per_rank = -(-num_cases // world_size)
        self.data_pass, self.position = 0, 0

    def start(self, data_pass, position=0):
        self.data_pass, self.position = data_pass, position

    def order(self, data_pass):
        """This rank's case indices for pass `data_pass`."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, data_pass))
        order = torch.randperm(self.num_cases, generator=generator).tolist()
        order += order[: self.per_rank * self.world_size - len(order)]
        return order[self.rank::self.world_size]

    def __iter__(self):
        data_pass, first = self.data_pass, self.position
        self.data_pass, self.position = data_pass + 1, 0  # a second iter() is the next pass
        order = self.order(data_pass)
        return iter([(data_pass, position, order[position]) for position in range(first, len(order))])

    def __len__(self):
        return self.per_rank


class SeededDraws(torch.utils.data.Dataset):
    """The items of a CacheDataset whose random transforms are reseeded, before each draw, from
    (seed, rank, pass, position); indexed by the keys of `TrainSampler`.

    MONAI transforms keep a numpy RandomState each (and DataLoader workers get copies of them), so their
    draws would depend on what came before; reseeding the Compose reseeds every one of them.
    """

    def __init__(self, dataset, seed, rank=0):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        data_pass, position, index = key
        self.dataset.transform.set_random_state(seed=derived_seed(self.seed, self.rank, data_pass, position))
        return self.dataset[index]


def _ignore_stop_signals(worker_id):
    # Ctrl-C reaches the whole process group, and SLURM signals every process of a job: the main process
    # alone decides to stop, saves, and shuts the workers down; a worker that died first would turn a clean
    # stop into a loader error.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def _own_generator(seed):
    """A loader's own random generator. Without one, each new iterator draws its base seed from the global
    torch stream the model's dropout uses, and MONAI's DataLoader with 0 workers re-seeds that stream at
    construction: a run's result would depend on data.num_workers."""
    return torch.Generator().manual_seed(seed)


def make_train_loader(d, num_classes, roi_size, batch_size, seed, rank=0, world_size=1):
    """Shuffled loader of random crops of the data section `d`'s training list; each batch holds
    `batch_size` volumes x data.num_samples crops of `roi_size`.

    Its sampler is a `TrainSampler`: `loader.sampler.start(pass, position)` sets where the next pass begins.
    """
    items = read_datalist(d, num_classes)["training"]
    transform = train_transforms(d, roi_size, num_classes)
    dataset = SeededDraws(_dataset(d, items, transform, progress=rank == 0), seed, rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=TrainSampler(len(items), seed, rank, world_size),
        num_workers=d["num_workers"],
        worker_init_fn=_ignore_stop_signals,
        # Workers kept across passes: no fork per pass, and each one's warnings (e.g. MONAI's "no available
        # indices of class k") appear once instead of once a pass. Their copies of the transforms are
        # reseeded before every draw, so keeping them changes no result.
        persistent_workers=d["num_workers"] > 0,
        generator=_own_generator(seed),
        drop_last=False,
    )


def make_eval_loader(d, num_classes, split):
    """Whole preprocessed volumes of `split` ("validation" or "test"), batch 1, with labels when all have one."""
    if split not in ("validation", "test"):
        raise DataConfigError(f"split must be 'validation' or 'test', got {split!r}")
    items = read_datalist(d, num_classes)[split]
    if not items:
        raise DataConfigError(f"{d['data_dir']}: the {split!r} list is empty")
    with_label = all("label" in e for e in items)
    if not with_label:
        items = [{"image": e["image"]} for e in items]
    return DataLoader(
        _dataset(d, items, eval_transforms(d, with_label=with_label), progress=False),
        batch_size=1,
        shuffle=False,
        num_workers=d["num_workers"],
        worker_init_fn=_ignore_stop_signals,
        generator=_own_generator(0),  # the volumes are not random: any seed will do
    )


def make_predict_loader(d, image_paths):
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
        Dataset(items, transform=eval_transforms(d, with_label=False)),
        batch_size=1,
        shuffle=False,
        num_workers=d["num_workers"],
        worker_init_fn=_ignore_stop_signals,
        generator=_own_generator(0),
    )
