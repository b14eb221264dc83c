"""The data of a pretraining run: its views, its raw images, and (labelled) the monitor splits."""
from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset, Subset

from byol.config import Config
from byol.data.errors import DataError
from byol.data.seeded import SeededSamples
from byol.data.shards import ShardDataset, ShardSamples
from byol.data.sources import Transformed, ViewPairs, heldout_split, labels_of, open_images
from byol.data.transforms import make_eval_transform, make_views


@dataclass
class PretrainData:
    """The pretraining views plus, for labelled data, kNN bank (train split) and test split."""

    views: SeededSamples  # (epoch, i) -> (view1, view2, label), seeded per sample (ShardSamples for shards)
    source: Dataset  # the raw images (its .skipped grows when a file fails to decode late)
    bank: Dataset | None
    test: Dataset | None
    num_classes: int
    skipped: list


def build_pretrain_data(cfg: Config, raw: Dataset | None = None) -> PretrainData:
    """Open the images (unless ``raw``, ``open_images(cfg.data)``, is given), hold out
    ``val_fraction`` per class when labelled, wrap for training."""
    raw = open_images(cfg.data) if raw is None else raw
    labels = labels_of(raw)
    skipped = list(getattr(raw, "skipped", []))
    train_idx, test_idx = heldout_split(cfg.data, raw)
    if len(train_idx) < cfg.optim.batch_size:
        raise DataError(
            f"optim.batch_size={cfg.optim.batch_size} is larger than the {len(train_idx)} "
            f"training images of {cfg.data.path or cfg.data.dataset}"
        )
    train = Subset(raw, train_idx)
    pairs = ViewPairs(train, make_views(cfg.augment))
    if isinstance(raw, ShardDataset):  # the sampler reads shards in a seeded shard order + buffer
        views = ShardSamples(pairs, cfg.train.seed, [raw.shard_of[i] for i in train_idx], cfg.data.shuffle_buffer)
    else:
        views = SeededSamples(pairs, cfg.train.seed)
    bank = test = None
    num_classes = 0
    if labels is not None and test_idx:
        tf = make_eval_transform(cfg.augment)
        bank, test = Transformed(train, tf), Transformed(Subset(raw, test_idx), tf)
        num_classes = max(labels) + 1
    return PretrainData(views, raw, bank, test, num_classes, skipped)
