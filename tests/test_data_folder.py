"""Image folder: scanning, labels, cheap checks, decoding, bad-file policy, limit, held-out split."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol.data.decode import check_file, decode_image
from byol.data.errors import DataError
from byol.data.folder import ImageFolderDataset, split_per_class
from byol.data.scan import IMAGE_EXTENSIONS, scan_folder
from byol.data.skips import write_skipped


def _write(path: Path, colour=(200, 30, 60), size=(6, 5), mode="RGB") -> Path:
    """Write a tiny real image (format from the suffix); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = colour if mode != "L" else colour[0]
    Image.new(mode, size, fill).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)  # noise so the entropy-coded part is long
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _make_bad_files(root: Path) -> list[Path]:
    (root / "a").mkdir(parents=True, exist_ok=True)
    (root / "b").mkdir(parents=True, exist_ok=True)
    empty = root / "a" / "empty.jpg"
    empty.write_bytes(b"")
    text = root / "b" / "notes.jpg"
    text.write_text("this is not an image\n")
    return [empty, _truncated_jpeg(root / "b" / "half.jpg"), text]


# ----------------------------------------------------------------------------- scan_folder


def test_scan_labelled_nested_hidden_and_extensions(tmp_path):
    _write(tmp_path / "cat" / "1.jpg")
    _write(tmp_path / "cat" / "deep" / "deeper" / "2.PNG")
    _write(tmp_path / "dog" / "3.JPEG")
    _write(tmp_path / "dog" / ".hidden.jpg")            # hidden file
    _write(tmp_path / "dog" / ".cache" / "4.jpg")        # hidden folder
    _write(tmp_path / ".trash" / "5.jpg")                # hidden first-level folder
    (tmp_path / "dog" / "readme.txt").write_text("x")    # not an image extension
    (tmp_path / "empty_class").mkdir()                   # no images: not a class
    _write(tmp_path / "zebra" / "6.bmp")
    index = scan_folder(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in index.files]
    assert rel == ["cat/1.jpg", "cat/deep/deeper/2.PNG", "dog/3.JPEG", "zebra/6.bmp"]
    assert index.classes == ("cat", "dog", "zebra")
    assert index.labels == (0, 0, 1, 2)
    assert index.root == tmp_path


def test_scan_unlabelled_when_an_image_lies_in_root(tmp_path):
    _write(tmp_path / "top.png")
    _write(tmp_path / "sub" / "b.jpg")
    _write(tmp_path / "sub" / "a.jpg")
    index = scan_folder(tmp_path)
    assert [p.name for p in index.files] == ["a.jpg", "b.jpg", "top.png"]  # "sub/.." < "top"
    assert index.labels is None and index.classes == ()


def test_extensions_constant():
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def test_scan_errors_are_one_line_and_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        scan_folder(missing)
    assert str(e.value) == f"data.path: folder not found: {missing}"
    file = _write(tmp_path / "x.png")
    with pytest.raises(DataError) as e:
        scan_folder(file)
    assert str(e.value) == f"data.path: not a folder: {file}"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "a.txt").write_text("x")
    with pytest.raises(DataError) as e:
        scan_folder(empty)
    assert str(e.value) == ("data.path: no images (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff) "
                            f"found under {empty}")
    assert isinstance(e.value, ValueError)
    assert str(DataError("two\nlines")) == "two lines"


# ----------------------------------------------------------------------------- check_file


@pytest.mark.parametrize("name", ["ok.png", "ok.jpg", "ok.bmp", "ok.webp", "ok.tiff"])
def test_check_file_accepts_valid_images(tmp_path, name):
    assert check_file(_write(tmp_path / name)) is None


def test_check_file_reasons(tmp_path):
    empty, truncated, text = _make_bad_files(tmp_path)
    assert check_file(empty) == "empty file"
    assert check_file(truncated) == "truncated JPEG (no end-of-image marker)"
    assert check_file(text) == "not an image (unrecognised header)"
    png = _write(tmp_path / "p.png", size=(40, 40))
    data = png.read_bytes()
    png.write_bytes(data[:-12])  # drop the IEND chunk
    assert check_file(png) == "truncated PNG (no IEND chunk)"


def test_check_file_tolerates_padding_after_jpeg_end_marker(tmp_path):
    jpg = _write(tmp_path / "pad.jpg")
    jpg.write_bytes(jpg.read_bytes() + b"\x00" * 300 + b"\n")
    assert check_file(jpg) is None


# ----------------------------------------------------------------------------- decode_image


@pytest.mark.parametrize("name", ["c.png", "c.bmp", "c.tif", "c.webp"])
def test_decode_exact_colour_lossless_formats(tmp_path, name):
    img = decode_image(_write(tmp_path / name, colour=(200, 30, 60), size=(7, 5)))
    assert img.dtype == torch.uint8 and img.shape == (3, 5, 7)
    if name != "c.webp":  # PIL writes lossy WEBP by default
        assert img[:, 0, 0].tolist() == [200, 30, 60]


def test_decode_grayscale_and_rgba_give_three_channels(tmp_path):
    gray = decode_image(_write(tmp_path / "g.png", colour=(90,), mode="L"))
    assert gray.shape == (3, 5, 6) and gray[:, 2, 2].tolist() == [90, 90, 90]
    rgba = decode_image(_write(tmp_path / "a.png", colour=(10, 20, 30, 128), mode="RGBA"))
    assert rgba.shape == (3, 5, 6) and rgba[:, 0, 0].tolist() == [10, 20, 30]
    gray_jpg = decode_image(_write(tmp_path / "g.jpg", colour=(90,), mode="L"))
    assert gray_jpg.shape == (3, 5, 6)


def test_decode_failure_raises_data_error_naming_file(tmp_path):
    _, _, text = _make_bad_files(tmp_path)
    with pytest.raises(DataError, match="cannot decode image .*notes.jpg"):
        decode_image(text)


# ----------------------------------------------------------------------------- dataset


def _good_folder(root: Path, per_class: int = 2, classes=("a", "b")) -> None:
    for k, c in enumerate(classes):
        for j in range(per_class):
            _write(root / c / f"{j}.png", colour=(k * 100, j * 50, 7))


def test_dataset_skip_policy_lists_bad_files_and_loads_good_ones(tmp_path):
    _good_folder(tmp_path)
    bad = _make_bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    assert sorted(p for p, _ in ds.skipped) == sorted(str(p) for p in bad)
    assert len(ds) == 4 and ds.classes == ["a", "b"] and ds.labels == [0, 0, 1, 1]
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.shape == (3, 5, 6) and img.dtype == torch.uint8
        assert label == ds.labels[i]
    assert ds[3][0][:, 0, 0].tolist() == [100, 50, 7]
    out = tmp_path / "skipped.tsv"
    write_skipped(ds.skipped, out)
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split("\t")) == 2 for line in lines)


def test_dataset_fail_policy_names_the_bad_file(tmp_path):
    _good_folder(tmp_path)
    _truncated_jpeg(tmp_path / "b" / "half.jpg")
    with pytest.raises(DataError, match=r"bad image file .*half\.jpg: truncated JPEG.*"
                                        r"data\.bad_files=skip"):
        ImageFolderDataset(tmp_path, bad_files="fail")


def test_dataset_full_verify_catches_what_quick_misses(tmp_path):
    _good_folder(tmp_path)
    png = _write(tmp_path / "b" / "corrupt.png", size=(40, 40))
    data = bytearray(png.read_bytes())
    data[40:60] = b"\x00" * 20  # corrupt the IHDR/IDAT but keep header and IEND
    png.write_bytes(bytes(data))
    assert check_file(png) is None
    assert len(ImageFolderDataset(tmp_path, verify="quick")) == 5
    full = ImageFolderDataset(tmp_path, verify="full")
    assert len(full) == 4 and [p for p, _ in full.skipped] == [str(png)]


def test_load_time_decode_failure_skip_and_fail(tmp_path):
    _good_folder(tmp_path)
    png = _write(tmp_path / "a" / "1.png")  # replaces a/1.png with a file we corrupt below
    data = bytearray(png.read_bytes())
    data[40:60] = b"\x00" * 20
    png.write_bytes(bytes(data))
    ds = ImageFolderDataset(tmp_path)  # quick check passes it
    assert ds.files[1] == png
    img, label = ds[1]  # falls through to the next index, deterministically
    assert label == ds.labels[2] and torch.equal(img, ds[2][0])
    assert [p for p, _ in ds.skipped] == [str(png)]
    ds[1]  # a known-bad file is not decoded or recorded again
    assert len(ds.skipped) == 1
    with pytest.raises(DataError, match=r"1\.png"):
        ImageFolderDataset(tmp_path, bad_files="fail")[1]


def test_dataset_unlabelled_returns_minus_one_and_transform_applies(tmp_path):
    _write(tmp_path / "x.png")
    _write(tmp_path / "y" / "z.jpg")
    ds = ImageFolderDataset(tmp_path, transform=lambda t: t.float() / 255)
    assert ds.labels is None and ds.classes == []
    sample, label = ds[0]
    assert label == -1 and sample.dtype == torch.float32


def test_dataset_all_bad_raises_naming_root_and_count(tmp_path):
    _make_bad_files(tmp_path)
    with pytest.raises(DataError, match=rf"{tmp_path}.*3 files"):
        ImageFolderDataset(tmp_path)


@pytest.mark.parametrize("kwargs, key", [
    ({"bad_files": "ignore"}, "data.bad_files"),
    ({"verify": "slow"}, "data.verify"),
    ({"limit": 0}, "data.limit"),
    ({"limit": -3}, "data.limit"),
])
def test_dataset_validates_arguments(tmp_path, kwargs, key):
    _good_folder(tmp_path)
    with pytest.raises(ValueError, match=key) as e:
        ImageFolderDataset(tmp_path, **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(e.value)


def test_limit_is_a_seeded_sorted_subset_covering_several_classes(tmp_path):
    classes = [f"c{k}" for k in range(5)]
    _good_folder(tmp_path, per_class=8, classes=classes)
    ds = ImageFolderDataset(tmp_path, limit=10, seed=3)
    assert len(ds) == 10 and ds.files == sorted(ds.files)
    assert len(set(ds.labels)) >= 3  # a prefix would hold only c0 and c1
    assert ds.classes == classes
    again = ImageFolderDataset(tmp_path, limit=10, seed=3)
    assert again.files == ds.files and again.labels == ds.labels
    other = ImageFolderDataset(tmp_path, limit=10, seed=4)
    assert other.files != ds.files
    assert len(ImageFolderDataset(tmp_path, limit=1000)) == 40


# ----------------------------------------------------------------------------- split_per_class


def test_split_per_class():
    labels = [0] * 10 + [1] * 20 + [2] * 3 + [3] * 1
    train, held = split_per_class(labels, 0.2, seed=0)
    assert set(train).isdisjoint(held) and sorted(train + held) == list(range(len(labels)))
    assert train == sorted(train) and held == sorted(held)
    per_class = Counter(labels[i] for i in held)
    # round(0.2 * n), at least 1 for classes of >= 2 items; the singleton stays in train
    assert per_class == {0: 2, 1: 4, 2: 1}
    assert split_per_class(labels, 0.2, seed=0) == (train, held)
    assert split_per_class(labels, 0.2, seed=1)[1] != held
    assert split_per_class(labels, 0.0, seed=0) == (list(range(len(labels))), [])


def test_split_per_class_keeps_a_training_example_and_validates():
    train, held = split_per_class([0, 0, 1, 1, 1], 0.9, seed=0)
    assert Counter([0, 0, 1, 1, 1][i] for i in train) == {0: 1, 1: 1}
    with pytest.raises(ValueError, match="1.0"):
        split_per_class([0, 1], 1.0, seed=0)
