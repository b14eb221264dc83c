"""One held-out split: pretraining's kNN monitor and every later evaluation test on the same images."""
from __future__ import annotations

import pytest

from byol.config import load_config
from byol.data.pretrain import build_pretrain_data
from byol.data.sources import heldout_split, open_images
from byol.eval.data import eval_splits
from conftest import TINY


@pytest.mark.parametrize("fraction", ["0.1", "0.3"])
def test_pretraining_and_evaluation_hold_out_the_same_images(image_folder, fraction):
    cfg = load_config(None, [*TINY, f"data.path={image_folder}", f"data.val_fraction={fraction}"])
    data, splits = build_pretrain_data(cfg), eval_splits(cfg)
    train_idx, test_idx = heldout_split(cfg.data, open_images(cfg.data))
    assert data.views.base.base.indices == splits.train.indices == train_idx
    assert data.test.base.indices == splits.test.indices == test_idx
    assert test_idx and not set(train_idx) & set(test_idx)
    assert sorted(train_idx + test_idx) == list(range(len(data.source)))


def test_nothing_is_held_out_at_val_fraction_0():
    cfg = load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=20", "data.val_fraction=0"])
    assert heldout_split(cfg.data, open_images(cfg.data)) == (list(range(20)), [])
