"""The labelled images an evaluation runs on, shared by every protocol (kNN, linear, fine-tune).

    splits = eval_splits(cfg)                                   # the run's own held-out split
    splits = eval_splits(cfg, train="/data/train", test="/data/test")   # transfer: any folders

``splits.train`` and ``splits.test`` yield raw ``(uint8 [3, H, W], label)``: each protocol adds
its own transform (centre crop for frozen features, crop + flip for training a classifier).
``sample_ids`` names every image (a file path, or ``shapes:<i>`` for the built-in data), so label
subsets can be saved as file lists, and ``fingerprint`` says whether the images changed (feature
caches are keyed by it).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset, Subset

from byol.config import Config
from byol.data.errors import DataError
from byol.data.folder import ImageFolderDataset
from byol.data.shapes import ShapesDataset
from byol.data.sources import heldout_split, labels_of, open_images


@dataclass
class EvalSplits:
    """Raw labelled train and test images with one class list (test labels mapped onto it)."""

    train: Dataset
    test: Dataset
    classes: list[str]
    tag: str  # names result files: "heldout" for the run's own split, else the test folder's name
    train_source: str  # where the images come from, for result files
    test_source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def labelled_folder(path: str, flag: str, cfg: Config, classes: list[str] | None = None) -> ImageFolderDataset:
    """An ImageFolderDataset that must have class folders; with ``classes`` its labels are mapped
    onto that list (a test folder may hold a subset of the train folder's classes)."""
    try:
        ds = ImageFolderDataset(path, bad_files=cfg.data.bad_files, verify=cfg.data.verify,
                                max_pixels=cfg.data.max_pixels)
    except DataError as e:  # the folder's errors speak of data.path; here the user gave a flag
        raise DataError(str(e).replace("data.path", flag, 1)) from None
    if ds.labels is None:
        raise DataError(f"{flag}: {path} has no class subfolders (evaluation needs labelled images)")
    if classes is not None and ds.classes != classes:
        missing = sorted(set(ds.classes) - set(classes))
        if missing:
            raise DataError(f"{flag}: classes {missing} of {path} are not in the --train folder")
        remap = [classes.index(c) for c in ds.classes]
        ds.labels = [remap[y] for y in ds.labels]
        ds.classes = list(classes)
    return ds


def folder_tag(path: str) -> str:
    """Names result files after a test folder: its parent and its name (/data/cifar100/test ->
    "cifar100_test"), so the test splits of two datasets do not overwrite each other."""
    p = Path(path).resolve()
    return f"{p.parent.name}_{p.name}" if p.parent.name else p.name


def eval_splits(cfg: Config, train: str | None = None, test: str | None = None,
                what: str = "eval", n_train: int | None = None) -> EvalSplits:
    """Folders ``train`` and ``test`` (both or neither); neither: the run's own data, split per
    class by ``data.val_fraction`` and ``data.seed`` exactly as pretraining split it (both call
    ``heldout_split``). ``n_train`` (the number of images the run trained on) guards that split:
    if the folder changed since, the split would differ and images the encoder trained on could
    land in the test set."""
    if (train is None) != (test is None):
        raise DataError(f"{what}: give both --train and --test, or neither (the run's held-out split)")
    if train is not None:
        train_ds = labelled_folder(train, "--train", cfg)
        test_ds = labelled_folder(test, "--test", cfg, classes=train_ds.classes)
        return EvalSplits(train_ds, test_ds, list(train_ds.classes), tag=folder_tag(test),
                          train_source=str(Path(train).resolve()), test_source=str(Path(test).resolve()))
    raw = open_images(cfg.data)
    if labels_of(raw) is None:
        raise DataError(f"{what}: the run's data {cfg.data.path} has no class subfolders; "
                        "give labelled --train and --test folders")
    if cfg.data.val_fraction == 0:
        raise DataError(f"{what}: the run held out no images (data.val_fraction=0); "
                        "give --train and --test folders")
    train_idx, test_idx = heldout_split(cfg.data, raw)  # the split build_pretrain_data made
    source = cfg.data.path or cfg.data.dataset
    if n_train is not None and len(train_idx) != n_train:
        raise DataError(f"{what}: the run trained on {n_train} images of {source} but its split now "
                        f"has {len(train_idx)}: the data changed, so its held-out split is not the "
                        "one the run held out; give --train and --test folders")
    return EvalSplits(Subset(raw, train_idx), Subset(raw, test_idx), list(raw.classes), tag="heldout",
                      train_source=f"{source} (train split)",
                      test_source=f"{source} (held-out {cfg.data.val_fraction:g} per class)")


def _base_and_indices(ds: Dataset) -> tuple[Dataset, list[int]]:
    """Unwrap (nested) Subsets: the underlying dataset and the indices into it."""
    indices = list(range(len(ds)))
    while isinstance(ds, Subset):
        indices = [ds.indices[i] for i in indices]
        ds = ds.dataset
    return ds, indices


def sample_ids(ds: Dataset) -> list[str]:
    """A stable name per sample: the file path of a folder image, ``shapes:<i>`` for shapes."""
    base, indices = _base_and_indices(ds)
    if isinstance(base, ImageFolderDataset):
        return [str(base.files[i].absolute()) for i in indices]  # any working directory
    if isinstance(base, ShapesDataset):
        return [f"shapes:{i}" for i in indices]
    return [f"{type(base).__name__}:{i}" for i in indices]


def sample_labels(ds: Dataset) -> list[int]:
    """The label of every sample, read without decoding any image."""
    base, indices = _base_and_indices(ds)
    labels = getattr(base, "labels", None)
    if labels is None:
        raise DataError(f"{type(base).__name__} has no labels")
    return [labels[i] for i in indices]


def fingerprint(ds: Dataset) -> str:
    """A hash that changes when any image or label changes: file paths with size and mtime
    (content changes rewrite those), or the generator's parameters for the built-in shapes."""
    base, indices = _base_and_indices(ds)
    h = hashlib.sha256()
    if isinstance(base, ImageFolderDataset):
        for i in indices:
            st = base.files[i].stat()
            label = base.labels[i] if base.labels is not None else -1
            h.update(f"{base.files[i]}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    elif isinstance(base, ShapesDataset):
        h.update(json.dumps({"shapes": [base.n, base.image_size, base.seed, base.colour],
                             "indices": indices}).encode())
    else:
        raise DataError(f"cannot fingerprint a {type(base).__name__} dataset for the feature cache")
    return h.hexdigest()
