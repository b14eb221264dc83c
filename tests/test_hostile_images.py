"""Hostile image folders: decompression bombs, every mode photo folders hold, EXIF orientation,
and folders the scan must survive (broken links, link loops, named pipes, unreadable folders)."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

from byol.augment.views import CropFlip, ViewSpec
from byol.config import Augment, Data
from byol.config.loading import load_config
from byol.config.sections import ConfigError
from byol.data import folder as folder_module
from byol.data.decode import check_file, decode_image
from byol.data.errors import DataError
from byol.data.folder import ImageFolderDataset, scan_folder
from byol.data.headers import DEFAULT_MAX_PIXELS, read_header
from byol.data.pipeline import DeviceViews
from byol.data.skips import write_skipped
from byol.data.sources import open_images
from byol.data.transforms import make_eval_transform, make_views

SRC = Path(__file__).resolve().parents[1] / "src"


# ----------------------------------------------------------------------------- file makers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(path: Path, width: int, height: int, depth: int, colour_type: int, rows) -> Path:
    """A PNG written chunk by chunk; ``rows`` yields the raw (unfiltered) scanlines in blocks."""
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b) for b in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
                     + _chunk(b"IEND", b""))
    return path


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG: some KiB on disk, ``width * height`` pixels decoded. Written
    from compressed zero rows, so the test never holds the image itself."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    blocks = [row * 1000] * (height // 1000) + [row * (height % 1000)]
    return _png(path, width, height, 1, 0, blocks)


def _rgb16_png(path: Path, rgb16: tuple[int, int, int], size=(3, 2)) -> Path:
    row = b"\x00" + struct.pack(">HHH", *rgb16) * size[0]
    return _png(path, size[0], size[1], 16, 2, [row * size[1]])


def _rgb16_tiff(path: Path, rgb16: tuple[int, int, int], size=(3, 2)) -> Path:
    """An uncompressed little-endian 16-bit RGB TIFF (PIL cannot write one)."""
    w, h = size
    pixels = struct.pack("<HHH", *rgb16) * (w * h)
    n = 10
    bits_at = 8 + 2 + 12 * n + 4
    pixels_at = bits_at + 6

    def entry(tag, kind, count, value: bytes) -> bytes:
        return struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")

    def short(v: int) -> bytes:
        return struct.pack("<H", v)

    def long(v: int) -> bytes:
        return struct.pack("<I", v)

    ifd = [entry(256, 3, 1, short(w)), entry(257, 3, 1, short(h)),  # width, height
           entry(258, 3, 3, long(bits_at)), entry(259, 3, 1, short(1)),  # 16 bits x 3, raw
           entry(262, 3, 1, short(2)), entry(273, 4, 1, long(pixels_at)),  # RGB, strip offset
           entry(277, 3, 1, short(3)), entry(278, 3, 1, short(h)),  # samples, rows per strip
           entry(279, 4, 1, long(len(pixels))), entry(284, 3, 1, short(1))]  # strip bytes, chunky
    path.write_bytes(b"II*\x00" + long(8) + short(n) + b"".join(ifd) + long(0)
                     + struct.pack("<HHH", 16, 16, 16) + pixels)
    return path


def _save(path: Path, im: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kwargs)
    return path


def _write(path: Path, colour=(200, 30, 60), size=(6, 5)) -> Path:
    return _save(path, Image.new("RGB", size, colour))


def _hwc(img: torch.Tensor) -> np.ndarray:
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
    return img.permute(1, 2, 0).numpy().astype(int)


class _DecoderSpy:
    """Records what torchvision.io.decode_image decodes (output shapes) and which images PIL
    decodes the pixels of (sizes)."""

    def __init__(self, monkeypatch) -> None:
        self.torchvision: list[tuple[int, ...]] = []
        self.pil: list[tuple[int, int]] = []
        real_tv, real_load = torchvision.io.decode_image, Image.Image.load

        def tv(data, *args, **kwargs):
            out = real_tv(data, *args, **kwargs)
            self.torchvision.append(tuple(out.shape))
            return out

        def load(im):
            self.pil.append(im.size)
            return real_load(im)

        monkeypatch.setattr(torchvision.io, "decode_image", tv)
        monkeypatch.setattr(Image.Image, "load", load)


@pytest.fixture
def pil_path(monkeypatch):
    """Make torchvision.io fail, so decode_image takes its PIL fallback."""
    def fail(*args, **kwargs):
        raise RuntimeError("torchvision.io switched off by the test")

    monkeypatch.setattr(torchvision.io, "decode_image", fail)


def _decode_without_warnings(path: Path, **kwargs) -> torch.Tensor:
    """decode_image, failing on any warning but torchvision's own deprecation notice."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = decode_image(path, **kwargs)
    noise = [str(w.message) for w in caught if "TorchVision are deprecated" not in str(w.message)]
    assert noise == []
    return img


def _run_script(script: str, *args: str, timeout: float = 120) -> dict:
    """Run ``script`` in a fresh interpreter (a hang fails the test after ``timeout`` s instead of
    hanging the suite); it prints one JSON object last."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DecompressionBomb" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- pixel limit


def test_bomb_is_refused_from_its_header_before_any_decoder(tmp_path, monkeypatch):
    bomb = _bomb_png(tmp_path / "bomb.png", 5000, 2000)
    assert bomb.stat().st_size < 20_000  # small on disk, 10 megapixels decoded
    reason = "5000 x 2000 = 10000000 pixels exceeds data.max_pixels=9999999"
    spy = _DecoderSpy(monkeypatch)
    assert check_file(bomb, max_pixels=9_999_999) == reason
    with pytest.raises(DataError) as e:
        decode_image(bomb, max_pixels=9_999_999)
    assert str(e.value) == f"cannot decode image {bomb}: {reason}"
    assert spy.torchvision == [] and spy.pil == []
    # At the limit, or without one, it is an ordinary image.
    assert check_file(bomb, max_pixels=10_000_000) is None
    img = decode_image(bomb, max_pixels=None)
    assert img.shape == (3, 2000, 5000) and int(img.max()) == 0
    assert spy.torchvision == [] and (5000, 2000) in spy.pil  # PNG: PIL's decoder (see decode.py)


@pytest.mark.parametrize("verify", ["quick", "full"])
def test_bombs_are_skipped_and_listed_with_the_reason(tmp_path, monkeypatch, verify):
    for k in range(3):
        _write(tmp_path / "a" / f"{k}.png", colour=(k, 2, 3))
    small = _bomb_png(tmp_path / "a" / "small_bomb.png", 4000, 3000)
    big = _bomb_png(tmp_path / "b" / "big_bomb.png", 20000, 15000)  # above the default limit
    default = ImageFolderDataset(tmp_path, verify=verify)
    assert default.max_pixels == DEFAULT_MAX_PIXELS == Data().max_pixels
    assert default.skipped == [
        (str(big), "20000 x 15000 = 300000000 pixels exceeds data.max_pixels=250000000")]
    spy = _DecoderSpy(monkeypatch)
    lower = ImageFolderDataset(tmp_path, verify=verify, max_pixels=1_000_000)
    assert sorted(lower.skipped) == [
        (str(small), "4000 x 3000 = 12000000 pixels exceeds data.max_pixels=1000000"),
        (str(big), "20000 x 15000 = 300000000 pixels exceeds data.max_pixels=1000000"),
    ]
    assert [p.name for p in lower.files] == ["0.png", "1.png", "2.png"]
    assert lower.labels == [0, 0, 0] and lower.classes == ["a", "b"]
    for i in range(len(lower)):
        assert lower[i][0].shape == (3, 5, 6)
    # Only the small images were ever decoded (the "full" check decodes each file once more);
    # PNGs by PIL (see decode.py)
    assert spy.torchvision == [] and set(spy.pil) == {(6, 5)}
    out = tmp_path / "skipped_files.tsv"
    write_skipped(lower.skipped, out)
    assert f"{big}\t20000 x 15000 = 300000000 pixels exceeds data.max_pixels=1000000" in (
        out.read_text().splitlines())


def test_bomb_under_fail_policy_stops_with_one_line_naming_the_file(tmp_path):
    _write(tmp_path / "a" / "ok.png")
    bomb = _bomb_png(tmp_path / "a" / "bomb.png", 4000, 3000)
    with pytest.raises(DataError) as e:
        ImageFolderDataset(tmp_path, bad_files="fail", max_pixels=1_000_000)
    assert str(e.value) == (f"bad image file {bomb}: 4000 x 3000 = 12000000 pixels exceeds "
                            "data.max_pixels=1000000 (set data.bad_files=skip to skip such files)")
    assert "\n" not in str(e.value)


def test_a_real_bomb_never_allocates_its_pixels(tmp_path):
    """20000 x 20000 (1.2 GB as RGB) next to one good image, checked and loaded in a fresh process
    whose peak memory must not grow by anything near that."""
    _write(tmp_path / "data" / "ok.png")
    bomb = _bomb_png(tmp_path / "data" / "bomb.png", 20000, 20000)
    out = _run_script("""
        import json, resource, sys
        from byol.data.decode import decode_image
        from byol.data.errors import DataError
        from byol.data.folder import ImageFolderDataset

        def peak_mib():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        before = peak_mib()
        reasons = []
        for verify in ("quick", "full"):
            ds = ImageFolderDataset(sys.argv[1], verify=verify)
            reasons += [r for _, r in ds.skipped]
            shapes = [list(ds[i][0].shape) for i in range(len(ds))]
        try:
            decode_image(sys.argv[2])
        except DataError as e:
            reasons.append(str(e))
        print(json.dumps({"grew_mib": peak_mib() - before, "reasons": reasons, "shapes": shapes}))
    """, str(tmp_path / "data"), str(bomb))
    limit = "20000 x 20000 = 400000000 pixels exceeds data.max_pixels=250000000"
    assert out["reasons"] == [limit, limit, f"cannot decode image {bomb}: {limit}"]
    assert out["shapes"] == [[3, 5, 6]]
    assert out["grew_mib"] < 200


def test_pil_bomb_check_never_refuses_or_warns_under_our_limit(tmp_path, monkeypatch):
    # Stand-in for a 200-MP photo against PIL's default limit of 89 MP (error above 179 MP): PIL's
    # limit set to 1000 pixels, the image has 3000 and data.max_pixels allows 10000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    rgb = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    for name in ("photo.bmp", "photo.tiff", "photo.png"):
        path = _save(tmp_path / name, Image.fromarray(rgb))
        assert check_file(path, max_pixels=10_000) is None
        assert np.array_equal(_hwc(_decode_without_warnings(path, max_pixels=10_000)), rgb)
    assert Image.MAX_IMAGE_PIXELS == 10_000
    small = _save(tmp_path / "small.bmp", Image.new("RGB", (40, 40)))
    assert decode_image(small, max_pixels=2_000).shape == (3, 40, 40)
    assert Image.MAX_IMAGE_PIXELS == 10_000  # never lowered
    assert np.array_equal(_hwc(_decode_without_warnings(tmp_path / "photo.tiff", max_pixels=None)),
                          rgb)
    assert Image.MAX_IMAGE_PIXELS is None


def test_pil_fallback_is_refused_by_the_limit_too(tmp_path, pil_path, monkeypatch):
    path = _write(tmp_path / "x.png", size=(60, 50))
    spy = _DecoderSpy(monkeypatch)
    with pytest.raises(DataError, match=r"60 x 50 = 3000 pixels exceeds data\.max_pixels=2999$"):
        decode_image(path, max_pixels=2999)
    assert spy.pil == []
    assert _hwc(decode_image(path, max_pixels=3000))[0, 0].tolist() == [200, 30, 60]


def test_header_sizes_agree_with_pil(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    exif = rgb.getexif()
    exif[0x0112] = 6
    files = [
        _save(tmp_path / "base.jpg", rgb),
        _save(tmp_path / "prog.jpg", rgb, progressive=True),
        _save(tmp_path / "exif.jpg", rgb, exif=exif),
        _save(tmp_path / "x.png", rgb),
        _save(tmp_path / "lossy.webp", rgb),
        _save(tmp_path / "lossless.webp", rgb, lossless=True),
        _save(tmp_path / "exif.webp", rgb, exif=exif),  # VP8X container
        _save(tmp_path / "x.bmp", rgb),
        _save(tmp_path / "rgba.bmp", rgb.convert("RGBA")),
        _save(tmp_path / "x.tiff", rgb),
        _save(tmp_path / "be.tiff", Image.frombytes("I;16B", (53, 37), b"\x12\x34" * 53 * 37)),
        _bomb_png(tmp_path / "one_bit.png", 53, 37),
    ]
    for path in files:
        header = read_header(path)
        assert (header.width, header.height) == (53, 37), path.name
    assert read_header(tmp_path / "exif.webp").needs_pil  # torchvision.io ignores its EXIF
    assert not read_header(tmp_path / "lossy.webp").needs_pil


def test_animated_webp_decodes_its_first_frame_only(tmp_path, monkeypatch):
    frames = [Image.new("RGB", (8, 6), c) for c in ((200, 30, 60), (10, 220, 40), (0, 0, 250))]
    path = _save(tmp_path / "anim.webp", frames[0], save_all=True, append_images=frames[1:],
                 lossless=True, duration=100)
    assert Image.open(path).n_frames == 3
    header = read_header(path)
    assert (header.width, header.height, header.needs_pil) == (8, 6, True)
    spy = _DecoderSpy(monkeypatch)
    img = decode_image(path)
    assert img.shape == (3, 6, 8) and _hwc(img)[0, 0].tolist() == [200, 30, 60]
    assert spy.torchvision == [] and set(spy.pil) == {(8, 6)}  # PIL decoded it


def test_max_pixels_is_validated_and_reaches_the_dataset_from_the_config(tmp_path):
    assert Data().max_pixels == 250_000_000 and Data(max_pixels=None).max_pixels is None
    for bad in (0, -5):
        with pytest.raises(ConfigError, match=r"data\.max_pixels must be > 0 or null"):
            Data(max_pixels=bad)
    _write(tmp_path / "a" / "small.png", size=(10, 10))
    large = _write(tmp_path / "a" / "large.png", size=(40, 30))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="data.max_pixels"):
            ImageFolderDataset(tmp_path, max_pixels=bad)
    cfg = load_config(None, [f"data.path={tmp_path}", "data.max_pixels=1000"])
    ds = open_images(cfg.data)
    assert ds.max_pixels == 1000
    assert ds.skipped == [(str(large), "40 x 30 = 1200 pixels exceeds data.max_pixels=1000")]
    cfg = load_config(None, [f"data.path={tmp_path}", "data.max_pixels=null"])
    unlimited = open_images(cfg.data)
    assert unlimited.max_pixels is None and unlimited.skipped == []


# ----------------------------------------------------------------------------- modes


def _case_cmyk_jpeg(d: Path):
    # Red in CMYK; a decoder that ignored the Adobe inversion would give cyan.
    return _save(d / "cmyk.jpg", Image.new("CMYK", (16, 8), (0, 255, 255, 0))), \
        np.full((8, 16, 3), (255, 0, 0)), 4


def _case_gray_jpeg(d: Path):
    return _save(d / "gray.jpg", Image.new("L", (16, 8), 90)), np.full((8, 16, 3), 90), 2


def _case_gray_png(d: Path):
    gray = np.arange(40, dtype=np.uint8).reshape(5, 8) * 6
    return _save(d / "gray.png", Image.fromarray(gray)), np.repeat(gray[..., None], 3, 2), 0


def _case_palette_transparency(d: Path):
    im = Image.new("P", (3, 2), 0)
    im.putpalette([5, 6, 7, 10, 200, 30, 1, 2, 3] + [0] * 759)
    im.putpixel((1, 0), 1)
    im.putpixel((2, 0), 2)
    path = _save(d / "palette.png", im, transparency=bytes([0, 128, 255]))  # a tRNS chunk
    assert Image.open(path).info["transparency"] == b"\x00\x80\xff"
    return path, np.array([[(5, 6, 7), (10, 200, 30), (1, 2, 3)], [(5, 6, 7)] * 3]), 0


_GRAY16 = np.array([[0, 255, 256, 1000, 30000], [43981, 65279, 65280, 65534, 65535]], np.uint16)
_GRAY16_AS_8 = np.repeat((_GRAY16 >> 8)[..., None], 3, 2)  # v >> 8; v / 257 rounds within 1


def _case_gray16_png(d: Path):
    path = _save(d / "gray16.png", Image.fromarray(_GRAY16))
    assert Image.open(path).mode == "I;16"
    return path, _GRAY16_AS_8, 1


def _case_gray16_tiff(d: Path):
    path = _save(d / "gray16.tiff", Image.fromarray(_GRAY16))
    assert Image.open(path).mode == "I;16"
    return path, _GRAY16_AS_8, 1


def _case_gray16_big_endian_tiff(d: Path):
    im = Image.frombytes("I;16B", (5, 2), _GRAY16.astype(">u2").tobytes())
    path = _save(d / "gray16be.tif", im)
    assert Image.open(path).mode == "I;16B"
    return path, _GRAY16_AS_8, 1


def _case_rgb16_png(d: Path):
    return _rgb16_png(d / "rgb16.png", (0x1234, 0xABCD, 0xFF00)), \
        np.full((2, 3, 3), (0x12, 0xAB, 0xFF)), 1


def _case_rgb16_tiff(d: Path):
    return _rgb16_tiff(d / "rgb16.tif", (0x1234, 0xABCD, 0xFF00)), \
        np.full((2, 3, 3), (0x12, 0xAB, 0xFF)), 1


def _case_rgba_png(d: Path):  # alpha dropped, even a fully transparent pixel keeps its colour
    return _save(d / "rgba.png", Image.new("RGBA", (4, 3), (10, 20, 30, 0))), \
        np.full((3, 4, 3), (10, 20, 30)), 0


def _case_la_png(d: Path):
    return _save(d / "la.png", Image.new("LA", (4, 3), (77, 100))), np.full((3, 4, 3), 77), 0


def _case_one_bit_png(d: Path):
    im = Image.new("1", (4, 2), 0)
    im.putpixel((3, 1), 1)
    expected = np.zeros((2, 4, 3))
    expected[1, 3] = 255
    return _save(d / "one_bit.png", im), expected, 0


def _case_one_pixel_png(d: Path):
    return _write(d / "pixel.png", (1, 2, 3), size=(1, 1)), np.array([[(1, 2, 3)]]), 0


def _case_one_pixel_jpeg(d: Path):
    return _write(d / "pixel.jpg", (128, 128, 128), size=(1, 1)), np.array([[(128, 128, 128)]]), 2


def _case_lossless_webp(d: Path):
    return _save(d / "c.webp", Image.new("RGB", (7, 5), (200, 30, 60)), lossless=True), \
        np.full((5, 7, 3), (200, 30, 60)), 0


def _case_bmp(d: Path):
    return _write(d / "c.bmp", size=(7, 5)), np.full((5, 7, 3), (200, 30, 60)), 0


def _case_tiff(d: Path):
    return _write(d / "c.tiff", size=(7, 5)), np.full((5, 7, 3), (200, 30, 60)), 0


MODE_CASES = {
    "cmyk_jpeg": _case_cmyk_jpeg, "gray_jpeg": _case_gray_jpeg, "gray_png": _case_gray_png,
    "palette_transparency": _case_palette_transparency, "gray16_png": _case_gray16_png,
    "gray16_tiff": _case_gray16_tiff, "gray16_big_endian_tiff": _case_gray16_big_endian_tiff,
    "rgb16_png": _case_rgb16_png, "rgb16_tiff": _case_rgb16_tiff, "rgba_png": _case_rgba_png,
    "la_png": _case_la_png, "one_bit_png": _case_one_bit_png, "one_pixel_png": _case_one_pixel_png,
    "one_pixel_jpeg": _case_one_pixel_jpeg, "lossless_webp": _case_lossless_webp,
    "bmp": _case_bmp, "tiff": _case_tiff,
}


@pytest.mark.parametrize("decoder", ["fast", "pil"])
@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_photo_mode_decodes_to_rgb_uint8(tmp_path, request, case, decoder):
    path, expected, tolerance = MODE_CASES[case](tmp_path)
    if decoder == "pil":
        request.getfixturevalue("pil_path")
    assert check_file(path) is None
    img = _decode_without_warnings(path)
    assert img.shape == (3, *expected.shape[:2]) and img.dtype == torch.uint8
    assert np.abs(_hwc(img) - expected).max() <= tolerance
    ds = ImageFolderDataset(tmp_path, verify="full")  # used, not skipped
    assert ds.skipped == [] and len(ds) == 1


# PIL's names for what each EXIF orientation asks, as numpy on [H, W, C] stored pixels.
_UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                  # mirrored
    3: lambda a: a[::-1, ::-1],               # rotated 180
    4: lambda a: a[::-1],                     # flipped
    5: lambda a: a.transpose(1, 0, 2),        # transposed
    6: lambda a: np.rot90(a, -1),             # stored turned 90 ccw: turn it 90 cw
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),              # stored turned 90 cw: turn it 90 ccw
}


def _marked(width=24, height=16) -> np.ndarray:
    """Gray, with a red 8x8 block in the top-left corner and a green one right of it."""
    a = np.full((height, width, 3), 128, np.uint8)
    a[:8, :8] = (255, 0, 0)
    a[:8, 8:16] = (0, 255, 0)
    return a


@pytest.mark.parametrize("decoder", ["fast", "pil"])
@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tiff"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_image_on_both_paths(tmp_path, request, orientation,
                                                                ext, decoder):
    stored = _marked()
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    options = {"jpg": {"quality": 95, "subsampling": 0}, "webp": {"lossless": True}}.get(ext, {})
    path = _save(tmp_path / f"o{orientation}.{ext}", im, exif=exif, **options)
    if decoder == "pil":
        request.getfixturevalue("pil_path")
    got = _hwc(_decode_without_warnings(path))
    upright = _UPRIGHT[orientation](stored)
    assert got.shape == upright.shape
    assert np.abs(got - upright).max() <= (12 if ext == "jpg" else 0)
    if orientation in (3, 6, 8):  # where the red corner of the stored image ends up
        h, w = got.shape[:2]
        corner = {3: (h - 1, w - 1), 6: (0, w - 1), 8: (h - 1, 0)}[orientation]
        assert got[corner].tolist() == pytest.approx([255, 0, 0], abs=12)


def test_one_pixel_image_goes_through_every_view_pipeline(tmp_path):
    img = decode_image(_write(tmp_path / "pixel.png", (10, 150, 240), size=(1, 1)))
    assert img.shape == (3, 1, 1)
    torch.manual_seed(0)
    crop = CropFlip(ViewSpec(size=32, semantics="torchvision"))(img)  # what feeds the batched path
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8
    assert (crop == img).all()  # a constant image stays that colour
    crop = CropFlip(ViewSpec(size=32))(img)  # official semantics: float crops in [0, 1]
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32
    assert torch.allclose(crop * 255, img.float(), atol=1e-3)
    aug = Augment()  # batched: crop + flip in the worker, the rest on the device
    v1, v2 = make_views(aug)(img)
    assert v1.shape == v2.shape == (3, 224, 224) and v1.dtype == torch.float32
    f1, f2 = DeviceViews(aug, seed=0)(v1[None], v2[None], step=0)
    assert f1.shape == f2.shape == (1, 3, 224, 224) and torch.isfinite(f1).all()
    reference = make_views(Augment(backend="reference"))(img)  # the views.py reference path
    assert all(v.shape == (3, 224, 224) and torch.isfinite(v).all() for v in reference)
    evaluated = make_eval_transform(aug)(img)
    assert evaluated.shape == (3, 224, 224) and torch.isfinite(evaluated).all()


# ----------------------------------------------------------------------------- the scan


def test_hostile_folder_scan_neither_hangs_nor_crashes(tmp_path):
    root = tmp_path / "data"
    _write(root / "a" / "1.png")
    _write(root / "a" / "2.png")
    (root / "a" / "self").symlink_to(root / "a")       # a link to its own parent folder
    (root / "a" / "up").symlink_to("..")               # and to the folder above
    (root / "a" / "x.jpg").symlink_to("missing.jpg")   # broken link
    (root / "a" / "loop.jpg").symlink_to("loop.jpg")   # a link to itself
    os.mkfifo(root / "a" / "pipe.jpg")                 # opening it for reading blocks
    (root / "a" / "pipe_link.jpg").symlink_to("pipe.jpg")
    (root / "a" / "notes").symlink_to("nowhere")       # not named like an image: ignored
    _write(root / "b" / "cat.jpg" / "3.png")            # a folder named like an image
    _write(root / "locked" / "4.png")                   # listing it fails (below)
    out = _run_script("""
        import json, os, sys
        from byol.data.errors import DataError
        from byol.data.folder import ImageFolderDataset

        root = sys.argv[1]
        real_scandir = os.scandir

        def scandir(path="."):  # what a folder without read permission does as a non-root user
            if os.path.basename(path) == "locked":
                raise PermissionError(13, "Permission denied", path)
            return real_scandir(path)

        os.scandir = scandir
        ds = ImageFolderDataset(root)
        rel = lambda p: os.path.relpath(p, root)
        out = {"files": [rel(p) for p in ds.files], "labels": ds.labels, "classes": ds.classes,
               "skipped": [[rel(p), r] for p, r in ds.skipped],
               "shapes": [list(ds[i][0].shape) for i in range(len(ds))]}
        try:
            ImageFolderDataset(root, bad_files="fail")
        except DataError as e:
            out["fail"] = str(e)
        print(json.dumps(out))
    """, str(root), timeout=60)
    assert out["files"] == ["a/1.png", "a/2.png", "b/cat.jpg/3.png"]
    assert out["classes"] == ["a", "b"] and out["labels"] == [0, 0, 1]
    assert out["shapes"] == [[3, 5, 6]] * 3
    assert out["skipped"] == [
        ["a/loop.jpg", "symbolic link loop"],
        ["a/pipe.jpg", "not a regular file (a named pipe)"],
        ["a/pipe_link.jpg", "not a regular file (a named pipe)"],
        ["a/x.jpg", "broken symbolic link (its target does not exist)"],
        ["locked", "unreadable folder: Permission denied"],
    ]
    assert out["fail"] == (f"bad image file {root / 'a' / 'loop.jpg'}: symbolic link loop "
                           "(set data.bad_files=skip to skip such files)")


def test_named_pipes_and_broken_links_are_refused_without_blocking(tmp_path):
    """check_file and decode_image on a named pipe (directly and through a link): opening one for
    reading waits for a writer forever, so this runs in a subprocess with a timeout."""
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    (tmp_path / "pipe_link.jpg").symlink_to("pipe.jpg")
    (tmp_path / "x.jpg").symlink_to("missing.jpg")
    out = _run_script("""
        import json, os, sys
        from byol.data.decode import check_file, decode_image
        from byol.data.errors import DataError

        out = {}
        for name in ("pipe.jpg", "pipe_link.jpg", "x.jpg"):
            path = os.path.join(sys.argv[1], name)
            out["check " + name] = check_file(path)
            try:
                decode_image(path)
            except DataError as e:
                out["decode " + name] = str(e)
        print(json.dumps(out))
    """, str(tmp_path), timeout=60)
    assert out == {
        "check pipe.jpg": "not a regular file (a named pipe)",
        "decode pipe.jpg": f"cannot decode image {pipe}: not a regular file (a named pipe)",
        "check pipe_link.jpg": "not a regular file (a named pipe)",
        "decode pipe_link.jpg": (f"cannot decode image {tmp_path / 'pipe_link.jpg'}: "
                                 "not a regular file (a named pipe)"),
        "check x.jpg": "cannot read file: No such file or directory",
        "decode x.jpg": (f"cannot decode image {tmp_path / 'x.jpg'}: "
                         "cannot read file: No such file or directory"),
    }


def test_folder_without_permissions(tmp_path):
    _write(tmp_path / "a" / "1.png")
    locked = tmp_path / "locked"
    _write(locked / "2.png")
    locked.chmod(0)
    try:
        readable = os.access(locked, os.R_OK | os.X_OK)  # as root permission bits do not bite
        ds = ImageFolderDataset(tmp_path)
    finally:
        locked.chmod(0o755)
    if readable:
        assert [p.name for p in ds.files] == ["1.png", "2.png"] and ds.skipped == []
    else:
        assert [p.name for p in ds.files] == ["1.png"]
        assert ds.skipped == [(str(locked), "unreadable folder: Permission denied")]


def test_unreadable_data_path_is_one_data_error(tmp_path, monkeypatch):
    _write(tmp_path / "a" / "1.png")

    def scandir(path="."):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError) as e:
        scan_folder(tmp_path)
    assert str(e.value) == f"data.path: cannot read folder {tmp_path}: Permission denied"


def test_a_folder_of_unusable_entries_says_why_it_holds_no_images(tmp_path):
    (tmp_path / "x.jpg").symlink_to("missing.jpg")
    with pytest.raises(DataError) as e:
        scan_folder(tmp_path)
    assert str(e.value) == (
        "data.path: no images (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff) found under "
        f"{tmp_path}; 1 could not be used, e.g. {tmp_path / 'x.jpg'}: broken symbolic link "
        "(its target does not exist)")


def test_file_gone_between_scan_and_check_is_skipped_with_a_reason(tmp_path, monkeypatch):
    _write(tmp_path / "a" / "1.png")
    gone = _write(tmp_path / "a" / "2.png")
    real_scan = folder_module.scan_folder

    def scan_then_delete(root):
        index = real_scan(root)
        gone.unlink()
        return index

    monkeypatch.setattr(folder_module, "scan_folder", scan_then_delete)
    ds = ImageFolderDataset(tmp_path)
    assert ds.skipped == [(str(gone), "cannot read file: No such file or directory")]
    assert [p.name for p in ds.files] == ["1.png"]


@pytest.mark.parametrize("listing", ["sorted", "reversed"])
def test_two_links_to_one_folder_find_it_under_the_first_name(tmp_path, monkeypatch, listing):
    """Whatever order the file system lists the entries in."""
    _write(tmp_path / "cats" / "1.png")
    (tmp_path / "felines").symlink_to("cats")
    real_scandir = os.scandir

    class Listing:
        def __init__(self, path):
            with real_scandir(path) as it:
                self.entries = sorted(it, key=lambda e: e.name, reverse=listing == "reversed")

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", Listing)
    index = scan_folder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in index.files] == ["cats/1.png"]
    assert index.classes == ("cats",)


def test_no_pil_plugin_outside_the_scanned_formats_ever_opens_a_file(tmp_path, monkeypatch):
    # An EPS file named like a JPEG: PIL's EPS plugin would run Ghostscript to decode it.
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    path = tmp_path / "poster.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(DataError, match="poster.jpg"):
        decode_image(path)
    Image.new("RGB", (4, 4)).save(tmp_path / "fine.png")
    ds = ImageFolderDataset(tmp_path, verify="full")  # no magic-byte filter up front
    assert ds.skipped and ds.skipped[0][0].endswith("poster.jpg")
    assert opened == []


def test_a_png_with_damaged_compressed_data_is_skipped_not_a_crash(tmp_path):
    """A PNG whose IDAT holds garbage (with a valid CRC, as a crafted file would) passes the quick
    check (its IEND is there). torchvision 0.29's PNG decoder kills the process on it (SIGSEGV);
    ours must not. Run in a child process, so that a crash fails this
    test instead of the whole session."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    i = data.find(b"IDAT")
    n = int.from_bytes(data[i - 4:i], "big")
    data[i + 4:i + 4 + n] = b"\xff" * n
    data[i + 4 + n:i + 8 + n] = zlib.crc32(bytes(data[i:i + 4 + n])).to_bytes(4, "big")
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data))
    code = ("from byol.data.decode import decode_image\nfrom byol.data.errors import DataError\n"
            f"try:\n    print('decoded', tuple(decode_image({str(path)!r}).shape))\n"
            "except DataError as e:\n    print('DataError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]  # -11 with torchvision's PNG decoder
    # PIL either refuses it (a DataError naming the file) or decodes what it can: never a crash
    out = proc.stdout.strip()
    assert out == "decoded (3, 40, 40)" or (out.startswith("DataError:") and "damaged.png" in out), out
