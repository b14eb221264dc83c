"""Supervised protocols of docs/method.md §5: label subsets, the frozen/fine-tuned classifier loop and
the `eval linear --protocol paper` / `eval finetune` commands on a tiny pretraining run."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset

from byol.augment.views import eval_transform
from byol.config import load_config
from byol.data.errors import DataError
from byol.data.seeded import SeededSamples
from byol.data.sources import Transformed
from byol.eval.data import eval_splits, sample_ids, sample_labels
from byol.eval.finetune import finetune_command, label_subset, load_subset, paper_linear_command, save_subset
from byol.eval.supervised import train_classifier, train_transform
from byol.models.backbones import resnet
from byol.train.pretrain import pretrain
from conftest import TINY, write_shapes_folder

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _cfg(tmp_path, name="r", *extra):
    # 64 shapes (8 classes x 8), 2 per class held out -> 48 train, 16 test images
    return load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=64",
                              "data.shapes_image_size=20", "data.val_fraction=0.25",
                              "optim.epochs=1", "eval.final_knn=false", f"train.out_dir={tmp_path}",
                              f"train.name={name}", *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return pretrain(_cfg(tmp_path_factory.mktemp("runs"))).run_dir


class Colours(Dataset):
    """An easy problem: class c is a noisy image whose channel c is bright. uint8 [3, 20, 20]."""

    def __init__(self, per_class: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = [i % 3 for i in range(3 * per_class)]
        noise = torch.randint(0, 90, (len(self.labels), 3, 20, 20), generator=g)
        self.images = [(n + 150 * torch.eye(3)[c][:, None, None]).to(torch.uint8)
                       for n, c in zip(noise, self.labels)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def _colour_sets(per_class=10):
    train = Transformed(Colours(per_class, seed=1), train_transform(16, MEAN, STD, crop_scale=(0.5, 1.0)))
    test = Transformed(Colours(per_class, seed=2), eval_transform(16, crop_fraction=1.0, mean=MEAN, std=STD))
    return train, test


def _encoder():
    torch.manual_seed(0)
    return resnet("resnet18", width=0.125, cifar_stem=True)


def _train(encoder, freeze, **kw):
    train, test = _colour_sets()
    args = dict(freeze_encoder=freeze, epochs=3, batch_size=8, lr=0.05, weight_decay=0.0, seed=0)
    return train_classifier(encoder, 3, train, test, **{**args, **kw})


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# ---- label subsets -------------------------------------------------------------------------

def test_label_subset_is_class_balanced_and_seeded():
    labels = [0] * 10 + [1] * 25 + [2] * 3 + [3] * 1 + [0] * 10
    for fraction in (0.1, 0.5, 1.0):
        idx = label_subset(labels, fraction, seed=0)
        assert idx == sorted(set(idx))
        counts = Counter(labels[i] for i in idx)
        want = {c: max(1, round(fraction * n)) for c, n in Counter(labels).items()}
        assert counts == want  # e.g. 0.1: {0: 2, 1: 2 (round(2.5)), 2: 1, 3: 1}
    assert label_subset(labels, 0.5, seed=0) == label_subset(labels, 0.5, seed=0)
    assert label_subset(labels, 0.5, seed=0) != label_subset(labels, 0.5, seed=1)
    # one class's draw does not depend on which other classes exist
    only_zeros = [i for i, y in enumerate(labels) if y == 0]
    picked = [only_zeros[i] for i in label_subset([0] * len(only_zeros), 0.5, seed=0)]
    assert picked == [i for i in label_subset(labels, 0.5, seed=0) if labels[i] == 0]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            label_subset(labels, bad, seed=0)


def test_label_subset_is_disjoint_from_the_test_split(tmp_path):
    splits = eval_splits(_cfg(tmp_path))  # the run's own held-out split of shapes
    train_ids, test_ids = sample_ids(splits.train), set(sample_ids(splits.test))
    assert len(train_ids) == 48 and len(test_ids) == 16
    idx = label_subset(sample_labels(splits.train), 0.5, seed=3)
    assert Counter(sample_labels(splits.train)[i] for i in idx) == {c: 3 for c in range(8)}
    assert not {train_ids[i] for i in idx} & test_ids

    write_shapes_folder(tmp_path / "train", n=30, classes=3)
    write_shapes_folder(tmp_path / "test", n=12, classes=3)
    splits = eval_splits(_cfg(tmp_path), str(tmp_path / "train"), str(tmp_path / "test"))
    train_ids = sample_ids(splits.train)
    picked = {train_ids[i] for i in label_subset(sample_labels(splits.train), 0.2, seed=0)}
    assert len(picked) == 6 and not picked & set(sample_ids(splits.test))


def test_subset_file_round_trip_and_missing_id(tmp_path):
    ids = [f"/data/{c}/{i}.jpg" for c in "ab" for i in range(5)]
    chosen = [1, 4, 7]
    path = tmp_path / "sub" / "labels.txt"
    save_subset(path, [ids[i] for i in chosen])
    assert path.read_text().splitlines() == ["/data/a/1.jpg", "/data/a/4.jpg", "/data/b/2.jpg"]
    assert load_subset(path, ids) == chosen
    reordered = ids[::-1]  # ids are matched by name, not position
    assert sorted(reordered[i] for i in load_subset(path, reordered)) == [ids[i] for i in chosen]
    with pytest.raises(DataError) as err:
        load_subset(path, ids[:5])  # /data/b/2.jpg is not available
    assert str(err.value).count("\n") == 0 and str(path) in str(err.value) and "/data/b/2.jpg" in str(err.value)
    with pytest.raises(DataError, match="no such file"):
        load_subset(tmp_path / "nope.txt", ids)


# ---- the classifier loop -------------------------------------------------------------------

def test_frozen_encoder_is_bitwise_unchanged_and_finetuning_changes_it():
    enc = _encoder()
    before = _snapshot(enc)
    out = _train(enc, freeze=True)
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert enc.training and all(p.requires_grad for p in enc.parameters())  # state restored
    assert out["steps"] == 3 * 4 and out["batch"] == 8 and out["n_train"] == 30

    _train(enc, freeze=False, epochs=1)
    after = enc.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert after["bn1.num_batches_tracked"].item() == before["bn1.num_batches_tracked"].item() + 4


def test_easy_problem_beats_chance_frozen_and_finetuned():
    frozen = _train(_encoder(), freeze=True, epochs=8, lr=0.1)
    tuned = _train(_encoder(), freeze=False, epochs=8, lr=0.05)
    for out in (frozen, tuned):  # chance: 33% top-1; top-5 over 3 classes is always 100%
        assert out["top1"] >= 80.0 and out["top5"] is None and out["n_test"] == 30


def test_same_seed_same_numbers_whatever_the_workers():
    enc_a, enc_b = _encoder(), _encoder()
    a = _train(enc_a, freeze=False, epochs=2)
    b = _train(enc_b, freeze=False, epochs=2, workers=2)
    assert (a["train_loss"], a["top1"]) == (b["train_loss"], b["top1"])
    assert all(torch.equal(x, y) for x, y in zip(enc_a.state_dict().values(), enc_b.state_dict().values()))
    c = _train(_encoder(), freeze=False, epochs=2, seed=1)
    assert c["train_loss"] != a["train_loss"]


def test_augmentation_is_seeded_per_sample_and_epoch():
    train, _ = _colour_sets()
    seeded = SeededSamples(train, seed=0)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    x = seeded[(0, 4)][0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert torch.equal(x, SeededSamples(train, seed=0)[(0, 4)][0])
    others = [SeededSamples(train, seed=0)[(1, 4)][0], SeededSamples(train, seed=1)[(0, 4)][0]]
    assert all(not torch.equal(x, o) for o in others)  # a new crop per epoch and per seed


def test_batch_clamped_and_single_image_last_batch_dropped():
    train, test = _colour_sets(per_class=3)  # 9 images
    enc = _encoder()
    out = train_classifier(enc, 3, train, test, freeze_encoder=False, epochs=1, batch_size=4, lr=0.01)
    assert out["steps"] == 2  # 4 + 4, the 9th image alone would break BatchNorm in train mode
    out = train_classifier(enc, 3, train, test, freeze_encoder=True, epochs=2, batch_size=100, lr=0.01)
    assert (out["batch"], out["steps"]) == (9, 2)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train_classifier(enc, 3, train, test, freeze_encoder=True, epochs=0, batch_size=4, lr=0.01)
    with pytest.raises(ValueError, match="batch_size must be >= 2 to fine-tune"):
        train_classifier(enc, 3, train, test, freeze_encoder=False, epochs=1, batch_size=1, lr=0.01)


# ---- the commands on a pretraining run -----------------------------------------------------

def test_paper_linear_command_writes_its_json(run_dir):
    out = paper_linear_command(str(run_dir), epochs=2, batch_size=16, device="cpu", workers=0)
    path = run_dir / "eval" / "linear_paper_heldout.json"
    assert out["written_to"] == str(path)
    saved = json.loads(path.read_text())
    assert saved["lr"] == pytest.approx(0.2 * 16 / 256) and saved["steps"] == 2 * 3
    assert (saved["n_train"], saved["n_test"], saved["num_classes"]) == (48, 16, 8)
    assert 0 <= saved["top1"] <= 100 and saved["random_init"] is False
    floor = paper_linear_command(str(run_dir), epochs=2, batch_size=16, device="cpu", workers=0,
                                 random_init=True)
    assert floor["written_to"].endswith("linear_paper_heldout_random_init.json")
    assert floor["train_loss"] != out["train_loss"]


def test_finetune_command_writes_json_and_subset_reused_by_labels_file(run_dir):
    out = finetune_command(str(run_dir), labels_fraction=0.25, epochs=2, batch_size=8,
                           device="cpu", workers=0)
    subset = run_dir / "eval" / "labels_25pct_seed0_heldout.txt"
    assert out["subset_file"] == str(subset)
    assert out["written_to"] == str(run_dir / "eval" / "finetune_25pct_heldout.json")
    lines = subset.read_text().splitlines()
    assert len(lines) == out["n_labelled"] == 16  # round(0.25 * 6) = 2 of each of 8 classes
    assert not set(lines) & set(sample_ids(eval_splits(_cfg(run_dir)).test))
    saved = json.loads((run_dir / "eval" / "finetune_25pct_heldout.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["batch"], saved["steps"]) == (2, 0.01, 8, 4)

    again = finetune_command(str(run_dir), labels_file=str(subset), epochs=2, batch_size=8,
                             device="cpu", workers=0)
    assert (again["n_labelled"], again["top1"], again["train_loss"]) == \
        (16, out["top1"], out["train_loss"])


def test_finetune_rejects_bad_arguments_and_overlapping_folders(run_dir, tmp_path):
    for kw, flag in (({"labels_fraction": 0.0}, "--labels-fraction"), ({"epochs": 0}, "--epochs"),
                     ({"batch_size": 1}, "--batch-size must be >= 2"), ({"lr": -1.0}, "--lr")):
        with pytest.raises(ValueError, match=flag):
            finetune_command(str(run_dir), device="cpu", **kw)
    folder = str(write_shapes_folder(tmp_path / "imgs", n=24, classes=3))
    with pytest.raises(DataError, match="also test images"):
        finetune_command(str(run_dir), train=folder, test=folder, epochs=1, device="cpu", workers=0)
