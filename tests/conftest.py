"""Shared fixtures: a tiny model config and small generated image folders (never real data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol.data.shapes import ShapesDataset

# A model small enough for a few CPU steps per test: ResNet-18 at 1/8 width, 16 px, tiny heads.
TINY = [
    "model.backbone=resnet18", "model.width=0.125", "model.cifar_stem=true",
    "model.projector_hidden=32", "model.projector_out=16", "model.predictor_hidden=32",
    "augment.preset=byol32", "augment.size=16",
    "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=1", "optim.base_lr=0.5",
    "data.num_workers=0", "train.progress=false", "train.log_every=1", "train.threads=1",
    "eval.knn_k=5",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run ops on tiny tensors: one thread avoids oversubscribing a small shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_shapes_folder(root: Path, n: int = 48, classes: int = 3, size: int = 20) -> Path:
    """A labelled ImageFolder of JPEGs drawn from the built-in shapes (first ``classes`` classes)."""
    ds = ShapesDataset(n * 8 // classes + 8, image_size=size, seed=3)
    written = 0
    for i in range(len(ds)):
        image, label = ds[i]
        if label >= classes:
            continue
        folder = root / ds.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.jpg", quality=95)
        written += 1
        if written == n:
            break
    return root


def add_bad_files(root: Path) -> list[Path]:
    """A zero-byte file, a truncated JPEG and a text file renamed .jpg, inside class folders."""
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    empty = first / "zero.jpg"
    empty.write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    half = first / "truncated.jpg"
    Image.fromarray(noise).save(half)
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    text = first / "notes.jpg"
    text.write_text("not an image\n")
    return [empty, half, text]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_shapes_folder(tmp_path / "images")


def tiny_byol(predictor: bool = True, **parts):
    """A BYOL around a linear encoder of 4x4 images (no batch norm anywhere), seeded: the same
    weights for every call with the same arguments. ``parts``: BYOL's target, loss, queue, ...;
    ``predictor=False`` drops q."""
    from byol.models import BYOL, MLPHead

    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8))
    projector = MLPHead(8, 16, 8)
    return BYOL(enc, 8, projector=projector,
                predictor=MLPHead(8, 16, 8) if predictor else torch.nn.Identity(), **parts)
