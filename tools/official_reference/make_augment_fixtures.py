"""Write tests/fixtures/official/augment.npz: augmentation values computed by DeepMind's released BYOL code.

Every value is produced by calling the release's own functions (``utils/augmentations.py`` and
``utils/dataset.py``) on fixed inputs; none of its code is copied here. tests/test_augment_official.py
reads the file with numpy only and checks byol.augment's official semantics (docs/fidelity.md) against it.

What is recorded (images are NHWC, as the release computes them; [0, 1] floats unless said otherwise):

* ``colour_*``: the release's raw colour adjustments on random images with grey, black and white pixels:
  ``adjust_brightness`` (a delta per image), ``adjust_contrast``, saturation and hue (``rgb_to_hsv``,
  ``adjust_saturation`` / ``adjust_hue``, ``hsv_to_rgb``), ``_to_grayscale`` and ``_solarize_single_image``;
* ``blur_*``: ``_gaussian_blur_single_image`` with "SAME" padding at several kernel sizes (radius 0, 1, 2
  and 11) and sigmas;
* ``crop_*``: the box of ``dataset._decode_and_random_crop`` for 1000 sets of four uniforms on seven image
  sizes, extreme aspect ratios included. The module's ``tf`` is replaced by a proxy whose
  ``random.uniform`` returns values computed from OUR uniforms (floats: u * (max - min) + min in float32;
  integers: min + floor(u * (max - min)) in float64, the convention of byol.augment.official.crop_box),
  whose ``extract_jpeg_shape`` returns the image size and whose ``decode_and_crop_jpeg`` records the window;
* ``resize_*``: ``tf.image.resize`` (BICUBIC, as ``dataset._preprocess_image`` calls it) of uint8 crops to
  several sizes, up and down, non-square;
* ``geo_*`` / ``eval_*``: ``dataset._preprocess_image`` end to end (crop with our uniforms, resize to 224,
  /255, clip) in PRETRAIN and EVAL mode on three small uint8 images given as already decoded tensors;
  512 fixed output pixels are kept of each 224x224 result;
* ``jitter_*``: ``_color_transform_single_image`` with the release's view-1 colour settings, for jax keys
  chosen so that all 24 jitter orders occur with the jitter on, and the jitter and grayscale off too;
* ``view_*``: the post-processing of one view per image (``_random_flip_single_image``,
  ``_color_transform_single_image``, ``_random_gaussian_blur`` with the release's kernel size
  (side / blur_divider), ``_solarize_single_image``, clip), with the release's view-2 settings, for keys
  chosen so that every step is both taken and skipped; sides 24 (blur radius 1) and 40 (radius 2);
* ``norm_*``: ``dataset.normalize_images``.

For ``jitter_*`` and ``view_*`` the parameters the keys produce are derived here by repeating the
release's key splits and draws (which coin, which order, which factor), and stored next to input and
output, so that the test can feed the same parameters to our implementation.

Development only (CI never runs this, it only reads what it writes); setup and versions:
tools/official_reference/README.md.
"""
from __future__ import annotations

import argparse
import math
from collections import deque
from pathlib import Path

import numpy as np
from release import import_release

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "official" / "augment.npz"
CROP_SIZES = ((375, 500), (500, 375), (224, 224), (32, 900), (900, 32), (3, 2), (17, 23))
RESIZES = (((24, 32), (16, 16)), ((24, 32), (40, 40)), ((40, 30), (32, 32)), ((40, 30), (12, 50)),
           ((7, 19), (24, 24)), ((1, 5), (3, 4)))
GEO_IMAGES = ((40, 30), (64, 48), (20, 90))
BLUR = ((1.6, 1.0), (2.4, 0.1), (2.4, 0.7), (2.4, 2.0), (4.4, 0.1), (4.4, 0.7), (4.4, 2.0), (22.4, 0.7),
        (22.4, 2.0))  # (kernel_size as the release computes it, side / 10; sigma)




class Proxy:
    """An object whose attributes are ``base``'s except the ones given as keywords."""

    def __init__(self, base, **overrides) -> None:
        self._base, self._overrides = base, overrides

    def __getattr__(self, name: str):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._base, name)


class FakeTF:
    """Installs a ``tf`` proxy in the release's dataset module: uniforms from a queue, image shapes
    and crops from tensors passed in place of JPEG bytes, and the crop windows recorded."""

    def __init__(self, release) -> None:
        import tensorflow.compat.v2 as tf

        self.tf, self.queue, self.windows = tf, deque(), []
        crop = Proxy(tf.image, extract_jpeg_shape=self._shape, decode_and_crop_jpeg=self._crop)
        release.data.tf = Proxy(tf, random=Proxy(tf.random, uniform=self._uniform), image=crop,
                                io=Proxy(tf.io, decode_and_crop_jpeg=self._crop))

    def _uniform(self, shape, minval=0, maxval=None, dtype=None, seed=None, name=None):
        tf = self.tf
        u = np.float32(self.queue.popleft())
        dtype = tf.float32 if dtype is None else dtype
        lo, hi = tf.convert_to_tensor(minval, dtype=dtype), tf.convert_to_tensor(maxval, dtype=dtype)
        if dtype.is_floating:  # as TensorFlow scales its own uniform: u * (max - min) + min
            return tf.constant(u, dtype=tf.float32) * (hi - lo) + lo
        n = int(hi.numpy()) - int(lo.numpy())
        return tf.constant(int(lo.numpy()) + min(math.floor(float(u) * n), n - 1), dtype=dtype)

    def _shape(self, image):
        return self.tf.shape(image)

    def _crop(self, image, window, channels=3):
        window = [int(v) for v in window.numpy()]
        self.windows.append(window)
        top, left, h, w = window
        return image[top:top + h, left:left + w, :channels]


def images01(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Random [0, 1] float32 images [n, h, w, 3] with grey, black and white pixels."""
    x = rng.random((n, h, w, 3), dtype=np.float32)
    x[:, 0, :, 1:] = x[:, 0, :, :1]  # a grey row
    x[:, 1, :3] = 0.0
    x[:, 1, 3:6] = 1.0
    x[:, 2, 0] = (1.0, 0.0, 0.0)  # pure colours and hue sector edges
    x[:, 2, 1] = (1.0, 1.0, 0.0)
    x[:, 2, 2] = (0.25, 0.75, 0.75)
    return x


def colour_ops(release, rng: np.random.Generator) -> dict:
    import jax
    import jax.numpy as jnp

    aug = release.aug
    x = images01(rng, 8, 10, 12)
    delta = rng.uniform(-0.5, 0.5, 8).astype(np.float32)
    contrast = rng.uniform(0.3, 1.7, 8).astype(np.float32)
    saturation = rng.uniform(0.0, 2.0, 8).astype(np.float32)
    hue = rng.uniform(-0.5, 0.5, 8).astype(np.float32)
    outs = {k: [] for k in ("brightness", "contrast", "saturation", "hue", "gray", "solarize")}
    for i in range(len(x)):
        rgb = tuple(jnp.asarray(x[i][..., c]) for c in range(3))
        stack = lambda t: np.stack([np.asarray(c) for c in t], axis=-1)  # noqa: E731
        outs["brightness"].append(stack(aug.adjust_brightness(rgb, delta[i])))
        outs["contrast"].append(stack(aug.adjust_contrast(rgb, contrast[i])))
        outs["saturation"].append(stack(aug.hsv_to_rgb(*aug.adjust_saturation(*aug.rgb_to_hsv(*rgb), saturation[i]))))
        outs["hue"].append(stack(aug.hsv_to_rgb(*aug.adjust_hue(*aug.rgb_to_hsv(*rgb), hue[i]))))
        outs["gray"].append(np.asarray(aug._to_grayscale(jnp.asarray(x[i]))))
        outs["solarize"].append(np.asarray(aug._solarize_single_image(jnp.asarray(x[i]), jax.random.PRNGKey(i),
                                                                      threshold=0.5, apply_prob=1.0)))
    out = {"colour_x": x, "colour_brightness_delta": delta, "colour_contrast_factor": contrast,
           "colour_saturation_factor": saturation, "colour_hue_delta": hue}
    out.update({f"colour_{k}": np.stack(v).astype(np.float32) for k, v in outs.items()})
    return out


def blur(release, rng: np.random.Generator) -> dict:
    import jax.numpy as jnp

    x = rng.random((24, 20, 3), dtype=np.float32)
    out = [np.asarray(release.aug._gaussian_blur_single_image(jnp.asarray(x), k, "SAME", np.float32(s)))
           for k, s in BLUR]
    return {"blur_x": x, "blur_kernel_size": np.array([k for k, _ in BLUR]),
            "blur_sigma": np.array([s for _, s in BLUR], dtype=np.float32), "blur_out": np.stack(out)}


def crop_boxes(release, fake: FakeTF, rng: np.random.Generator) -> dict:
    tf = fake.tf
    u = rng.random((1000, 4), dtype=np.float32)
    u[:8] = [[0, 0, 0, 0], [1 - 2 ** -24] * 4, [0, 1 - 2 ** -24, 0.5, 0.5], [1 - 2 ** -24, 0, 0.5, 0.5],
             [0.5, 0.5, 0, 1 - 2 ** -24], [0.5, 0.5, 1 - 2 ** -24, 0], [1 - 2 ** -24, 1 - 2 ** -24, 0, 0],
             [1 - 2 ** -24, 0, 1 - 2 ** -24, 1 - 2 ** -24]]
    boxes = np.zeros((len(CROP_SIZES), len(u), 4), dtype=np.int16)
    for s, (h, w) in enumerate(CROP_SIZES):
        image = tf.zeros((h, w, 3), dtype=tf.uint8)
        for i in range(len(u)):
            fake.queue.extend(u[i])
            fake.windows.clear()
            release.data._decode_and_random_crop(image)
            assert not fake.queue and len(fake.windows) == 1
            boxes[s, i] = fake.windows[0]
    return {"crop_u": u, "crop_sizes": np.array(CROP_SIZES, dtype=np.int32), "crop_boxes": boxes}


def resizes(release, fake: FakeTF, rng: np.random.Generator) -> dict:
    tf = fake.tf
    out = {}
    for i, ((h, w), size) in enumerate(RESIZES):
        x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out[f"resize_in_{i}"] = x
        out[f"resize_out_{i}"] = tf.image.resize(x, size, tf.image.ResizeMethod.BICUBIC).numpy()
    out["resize_count"] = np.array(len(RESIZES))
    return out


def geometric(release, fake: FakeTF, rng: np.random.Generator) -> dict:
    tf, data = fake.tf, release.data
    yx = np.stack([rng.integers(0, 224, 512), rng.integers(0, 224, 512)], axis=1).astype(np.int32)
    u = rng.random((2 * len(GEO_IMAGES), 4), dtype=np.float32)
    out = {"geo_yx": yx, "geo_u": u}
    views, evals = [], []
    for i, (h, w) in enumerate(GEO_IMAGES):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[: h // 3, : w // 3] = 255  # flat patches: bicubic over- and undershoots at their edges
        img[h // 2:, w // 2:] = 0
        out[f"geo_img_{i}"] = img
        for j in (2 * i, 2 * i + 1):
            fake.queue.extend(u[j])
            view = data._preprocess_image(tf.constant(img), data.PreprocessMode.PRETRAIN).numpy()
            views.append(view[yx[:, 0], yx[:, 1]])
            assert not fake.queue
        fake.windows.clear()
        evals.append(data._preprocess_image(tf.constant(img), data.PreprocessMode.EVAL).numpy()[yx[:, 0], yx[:, 1]])
        out[f"eval_box_{i}"] = np.array(fake.windows[0], dtype=np.int32)
    out["geo_out"], out["eval_out"] = np.stack(views), np.stack(evals)
    return out


def colour_params(key, cfg: dict) -> dict:
    """The draws ``_color_transform_single_image(image, key, **cfg)`` makes, by repeating its key splits:
    the apply coin and the rest from the first split, then the rest split seven ways (order, brightness,
    contrast, saturation, hue, jitter coin, grayscale coin)."""
    import jax
    import jax.numpy as jnp

    apply_key, rest = jax.random.split(key)
    perm, b, c, s, h, cj, gs = jax.random.split(rest, 7)
    applied = bool(jax.random.uniform(apply_key, shape=()) <= cfg["apply_prob"])
    return {
        "jitter": applied and bool(jax.random.uniform(cj, shape=()) <= cfg["color_jitter_prob"]),
        "gray": applied and bool(jax.random.uniform(gs, shape=()) <= cfg["to_grayscale_prob"]),
        "order": np.asarray(jax.random.permutation(perm, jnp.arange(4, dtype=jnp.int32))),
        "brightness": float(jax.random.uniform(b, shape=(), minval=-cfg["brightness"], maxval=cfg["brightness"])),
        "contrast": float(jax.random.uniform(c, shape=(), minval=1 - cfg["contrast"], maxval=1 + cfg["contrast"])),
        "saturation": float(jax.random.uniform(s, shape=(), minval=1 - cfg["saturation"],
                                               maxval=1 + cfg["saturation"])),
        "hue": float(jax.random.uniform(h, shape=(), minval=-cfg["hue"], maxval=cfg["hue"])),
    }


def _pack(prefix: str, params: list[dict]) -> dict:
    return {f"{prefix}_{k}": np.array([p[k] for p in params], dtype=np.float32 if isinstance(params[0][k], float)
                                      else None) for k in params[0]}


def jitter(release, rng: np.random.Generator) -> dict:
    import jax
    import jax.numpy as jnp

    cfg = dict(release.aug.augment_config["view1"]["color_transform"])
    keys, params, orders = [], [], set()
    off = {(False, False): 0, (False, True): 0}
    for seed in range(100000):
        p = colour_params(jax.random.PRNGKey(seed), cfg)
        order = tuple(int(v) for v in p["order"])
        if p["jitter"] and order not in orders:
            orders.add(order)
        elif not p["jitter"] and off[(False, p["gray"])] < 2:
            off[(False, p["gray"])] += 1
        else:
            continue
        keys.append(seed)
        params.append(p)
        if len(orders) == 24 and min(off.values()) == 2:
            break
    assert len(orders) == 24 and any(p["gray"] and p["jitter"] for p in params)
    x = rng.integers(0, 256, (len(keys), 8, 8, 3), dtype=np.uint8)
    x[:, 0, :, 1:] = x[:, 0, :, :1]
    y = [np.asarray(release.aug._color_transform_single_image(
        jnp.asarray(x[i].astype(np.float32) / np.float32(255)), jax.random.PRNGKey(k), **cfg))
        for i, k in enumerate(keys)]
    cfg_out = {f"jitter_cfg_{k}": np.array(float(v)) for k, v in cfg.items()}
    return {"jitter_x": x, "jitter_out": np.stack(y), "jitter_keys": np.array(keys), **_pack("jitter", params),
            **cfg_out}


def view_params(key, colour_cfg: dict, blur_cfg: dict, solarize_cfg: dict) -> tuple[dict, tuple]:
    """The draws of one view's post-processing with ``key``, split four ways (flip, colour, blur, solarize)
    as the release splits a batch's key, and the keys themselves."""
    import jax

    k_flip, k_colour, k_blur, k_solar = jax.random.split(key, 4)
    p = colour_params(k_colour, colour_cfg)
    p["flip"] = bool(jax.random.uniform(jax.random.split(k_flip)[1], shape=()) <= 0.5)
    apply_key, rest = jax.random.split(k_blur)
    (sigma_key,) = jax.random.split(rest, 1)
    p["blur"] = bool(jax.random.uniform(apply_key, shape=()) <= blur_cfg["apply_prob"])
    p["sigma"] = float(jax.random.uniform(sigma_key, shape=(), minval=blur_cfg["sigma_min"],
                                          maxval=blur_cfg["sigma_max"], dtype=np.float32))
    p["solarize"] = bool(jax.random.uniform(k_solar, shape=()) <= solarize_cfg["apply_prob"])
    return p, (k_flip, k_colour, k_blur, k_solar)


def views(release, rng: np.random.Generator) -> dict:
    import jax
    import jax.numpy as jnp

    aug = release.aug
    preset = aug.augment_config["view2"]
    colour_cfg, blur_cfg, solar_cfg = (dict(preset[k]) for k in ("color_transform", "gaussian_blur", "solarize"))
    out = {f"view_cfg_{k}": np.array(float(v)) for k, v in blur_cfg.items()}
    out.update({f"view_cfg_solarize_{k}": np.array(float(v)) for k, v in solar_cfg.items()})
    out.update({f"view_cfg_colour_{k}": np.array(float(v)) for k, v in colour_cfg.items()})
    # side 24: every step taken and skipped; side 40 (blur radius 2): blur taken and skipped
    for side, n, steps in ((24, 8, ("flip", "jitter", "gray", "blur", "solarize")), (40, 3, ("blur",))):
        missing = {(b, v) for b in steps for v in (False, True)}
        chosen, params = [], []
        for seed in range(1000 * side, 1000 * side + 100000):
            p, keys = view_params(jax.random.PRNGKey(seed), colour_cfg, blur_cfg, solar_cfg)
            states = {(b, p[b]) for b in steps}
            if states & missing or len(chosen) + len(missing) < n:  # a new branch, or room for any key
                missing -= states
                chosen.append(keys)
                params.append(p)
            if len(chosen) == n and not missing:
                break
        assert len(chosen) == n and not missing, missing
        x = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        x[:, : side // 4, : side // 4] = 255
        x[:, 0, :, 1:] = x[:, 0, :, :1]
        y = []
        for i, (k_flip, k_colour, k_blur, k_solar) in enumerate(chosen):
            img = jnp.asarray(x[i].astype(np.float32) / np.float32(255))
            img = aug._random_flip_single_image(img, k_flip)
            img = aug._color_transform_single_image(img, k_colour, **colour_cfg)
            img = aug._random_gaussian_blur(img, k_blur, kernel_size=side / blur_cfg["blur_divider"], padding="SAME",
                                            sigma_min=blur_cfg["sigma_min"], sigma_max=blur_cfg["sigma_max"],
                                            apply_prob=blur_cfg["apply_prob"])
            img = aug._solarize_single_image(img, k_solar, threshold=solar_cfg["threshold"],
                                             apply_prob=solar_cfg["apply_prob"])
            y.append(np.asarray(jnp.clip(img, 0.0, 1.0)))
        out[f"view_x_{side}"], out[f"view_out_{side}"] = x, np.stack(y)
        out.update({f"{k}_{side}": v for k, v in _pack("view", params).items()})
    return out


def normalisation(release, rng: np.random.Generator) -> dict:
    import jax.numpy as jnp

    x = rng.random((2, 6, 5, 3), dtype=np.float32)
    return {"norm_x": x, "norm_out": np.asarray(release.data.normalize_images(jnp.asarray(x)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="/work/dmbyol", help="directory holding the release's byol package")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    release = import_release(args.release)
    fake = FakeTF(release)
    rng = np.random.default_rng(20200613)
    out = {}
    for part in (colour_ops, blur, normalisation, jitter, views):
        out.update(part(release, rng))
    for part in (crop_boxes, resizes, geometric):
        out.update(part(release, fake, rng))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: {len(out)} arrays, {Path(args.out).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
