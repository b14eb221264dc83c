"""Pictures of an encoder: nearest neighbours of query images and a 2-D map of a folder.

    byol neighbors runs/demo images/ --out neighbors.png   # + neighbors.json
    byol map runs/demo images/ --out map.png               # + map.json

Both embed the folder once with the encoder's centre-crop eval transform (``byol.embed``) and keep
the features in the evaluation feature cache (``byol.eval.cache``: keyed by the encoder file's
sha256, the folder's fingerprint and the transform), so a second picture of the same folder
skips the encoder. Similarity is the cosine of the representations y; the map is PCA of the
L2-normalised y (numpy SVD, no extra dependency). Same inputs and seed: same pictures, same JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from byol.data.decode import decode_image
from byol.data.errors import DataError
from byol.data.folder import ImageFolderDataset
from byol.data.transforms import eval_crop_fraction
from byol.data.workers import default_workers
from byol.embed import _Decoded, _open_encoder, encoder_transform
from byol.eval.cache import cached_features
from byol.eval.data import fingerprint
from byol.export import _run_encoder, is_encoder_file
from byol.files import atomic_path, atomic_write_text, sha256_file
from byol.train.runtime import resolve_device

CELL = 112  # pixels per grid cell of the neighbours figure: a thumbnail and its caption
DPI = 100
THUMB = 96  # longest side of a thumbnail, pixels
MAX_MAP_THUMBS = 250  # --thumbnails: at most this many images on the map, the rest as points


class Embedded(NamedTuple):
    """Representations of a folder: ``features`` float32 [N, D] (CPU), ``files`` the N image
    paths (row order), ``labels`` int64 [N] or None (no class subfolders), ``classes``, ``root``,
    ``hit`` (read from the feature cache), ``skipped`` [(file, reason)], ``extra`` float32 [E, D]:
    the representations of the ``extra`` files asked for (not cached)."""

    features: torch.Tensor
    files: list[Path]
    labels: torch.Tensor | None
    classes: list[str]
    root: Path
    hit: bool
    skipped: list
    extra: torch.Tensor


def _encoder(source: str | os.PathLike, dev: torch.device, what: str):
    """-> (encoder, its byol_meta, identity for the cache key, cache dir) of an encoder file or a run."""
    path = Path(source)
    if is_encoder_file(path):
        if not path.is_file():
            raise DataError(f"{what}: encoder file not found: {path}")
        encoder, meta = _open_encoder(path, dev)
        return encoder, meta, {"encoder_sha256": sha256_file(path)}, path.parent / "feature_cache"
    if not path.exists():
        raise DataError(f"{what}: encoder or run not found: {path}")
    from byol.eval.commands import load_checkpoint_run

    loaded = load_checkpoint_run(path)  # one read: the digest is of exactly the weights used
    encoder, arch = _run_encoder(loaded)
    meta = {**arch, "eval_crop_fraction": eval_crop_fraction(arch["image_size"])}
    cache_dir = (loaded.run_dir / "eval" if loaded.run_dir else loaded.checkpoint.parent) / "feature_cache"
    return encoder.to(dev), meta, {"checkpoint_sha256": loaded.digest}, cache_dir


def embed_for_pictures(source: str | os.PathLike, folder: str | os.PathLike, *, what: str = "pictures",
                       batch_size: int = 256, device: str = "auto", workers: int | None = None,
                       cache: bool = True, progress: bool = True, extra: list[Path] = ()) -> Embedded:
    """The representations y [N, D] of every decodable image under ``folder`` (recursive), with
    the encoder of ``source`` (an exported .safetensors / .pkl, a run dir or a checkpoint),
    through the feature cache (``cache=False``: neither read nor written); and those of the
    ``extra`` image files [E, D] (e.g. queries outside ``folder``), with the same encoder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what}: images folder not found: {folder}")
    dev = resolve_device(device, what="--device")
    encoder, meta, identity, cache_dir = _encoder(source, dev, what)
    try:
        images = ImageFolderDataset(folder, bad_files="skip", verify="quick")
    except DataError as e:  # its messages name data.path; here the user gave FOLDER
        raise DataError(str(e).replace("data.path", f"{what} FOLDER", 1)) from None
    tf = encoder_transform(meta)
    data = _Decoded(images.files, tf, meta["image_size"])
    # rows carry file indices (-1: failed to decode), not labels: "rows" keeps these keys apart
    # from the linear evaluation's, which store labels
    key = {**identity, "data": fingerprint(images), "transform": repr(tf), "rows": "file_index"}
    got = cached_features(encoder, data, cache_dir=cache_dir if cache else None, key_parts=key,
                          batch_size=batch_size, device=dev, workers=default_workers(workers, dev),
                          progress=progress, desc=what)
    keep = (got.labels >= 0).nonzero().flatten()
    if keep.numel() == 0:
        raise DataError(f"{what}: no image under {folder} could be decoded")
    skipped = [tuple(s) for s in images.skipped]
    skipped += [(str(images.files[i]), "could not be decoded") for i in (got.labels < 0).nonzero().flatten().tolist()]
    labels = None if images.labels is None else torch.tensor(images.labels, dtype=torch.long)[keep]
    more = torch.zeros(0, got.features.shape[1])
    if extra:
        with torch.no_grad():
            x = torch.stack([tf(decode_image(p)) for p in extra]).to(dev)
            more = encoder.eval()(x.contiguous(memory_format=torch.channels_last)).float().cpu()
    return Embedded(got.features[keep].float(), [images.files[i] for i in keep.tolist()], labels,
                    list(images.classes), images.root, got.hit, skipped, more)


def _rows_of(queries: list[Path], files: list[Path]) -> list[int]:
    """The row in ``files`` of each query (-1: none): the same path as written, or the same file
    once links are followed (a query given outside FOLDER that is one of its images)."""
    rows: dict[Path, int] = {}
    for i, f in enumerate(files):
        rows.setdefault(Path(os.path.abspath(f)), i)
        rows.setdefault(f.resolve(), i)
    return [rows.get(Path(os.path.abspath(q)), rows.get(q.resolve(), -1)) for q in queries]


def nearest(features: torch.Tensor, queries: torch.Tensor, k: int,
            exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours: features [N, D], queries [Q, D], exclude [Q] int64 (row of each
    query in ``features``, -1: none) -> (similarities [Q, k] descending, indices [Q, k])."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    sim = q @ x.T  # [Q, N]; float64: ties and order are the same on every run
    if exclude is not None:
        rows = (exclude >= 0).nonzero().flatten()
        sim[rows, exclude[rows]] = -float("inf")
    values, indices = torch.topk(sim, k, dim=1, largest=True, sorted=True)
    return values.float(), indices


def pca_2d(features: torch.Tensor) -> np.ndarray:
    """PCA of the L2-normalised features [N, D] -> coordinates [N, 2] float64 (first two
    principal components; each component's sign fixed so its largest loading is positive)."""
    x = torch.nn.functional.normalize(features.double(), dim=1).numpy()
    x = x - x.mean(axis=0, keepdims=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], x.shape[1]))])
    signs = np.sign(comps[np.arange(2), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1
    return x @ (comps * signs[:, None]).T


def _thumb(path: Path) -> np.ndarray:
    """An image as uint8 [h, w, 3], its longest side at most THUMB pixels."""
    from torchvision.transforms.functional import resize

    img = decode_image(path)
    h, w = img.shape[1:]
    if max(h, w) > THUMB:
        s = THUMB / max(h, w)
        img = resize(img, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
    return img.permute(1, 2, 0).numpy()


def _rel(emb: Embedded, path: Path) -> str:
    """``path`` relative to FOLDER as written, else once links are followed, else as given."""
    for p, root in ((Path(os.path.abspath(path)), Path(os.path.abspath(emb.root))),
                    (path.resolve(), emb.root.resolve())):
        if p.is_relative_to(root):
            return p.relative_to(root).as_posix()
    return str(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_out(out: Path, what: str) -> None:
    if out.suffix.lower() != ".png":
        raise ValueError(f"{what}: --out must end in .png, got {out}")


def neighbors_picture(source: str | os.PathLike, folder: str | os.PathLike, out: str | os.PathLike, *,
                      queries: list[str] | None = None, n_queries: int = 8, k: int = 8, seed: int = 0,
                      batch_size: int = 256, device: str = "auto", workers: int | None = None,
                      cache: bool = True, progress: bool = True) -> dict:
    """``byol neighbors``: a grid of Q query images (rows) with their top-k cosine neighbours in
    ``folder`` (columns 2..k+1, similarity under each) -> ``out`` (PNG, (k+1)*CELL x Q*CELL
    pixels) and ``<stem>.json`` ({queries: [{file, label, neighbours: [{file, similarity, label}]}]}).
    Queries: the given files, else ``n_queries`` drawn with ``seed``. A query is never its own
    neighbour. Returns the JSON's content plus ``out``, ``json``, ``n``, ``hit``, ``skipped``."""
    what = "neighbors"
    out = Path(out)
    _check_out(out, what)
    if k < 1:
        raise ValueError(f"{what}: --k must be >= 1, got {k}")
    if not queries and n_queries < 1:
        raise ValueError(f"{what}: --n-queries must be >= 1, got {n_queries}")
    for q in queries or []:
        if not Path(q).is_file():
            raise FileNotFoundError(f"{what}: query image not found: {q}")
    q_files = [Path(q) for q in queries or []]
    # a query under FOLDER (as written, before links are followed: a folder of symlinked images is
    # common) is one of its rows; any other is embedded on its own, not cached
    outside = [p for p in q_files if not Path(os.path.abspath(p)).is_relative_to(os.path.abspath(folder))]
    emb = embed_for_pictures(source, folder, what=what, batch_size=batch_size, device=device,
                             workers=workers, cache=cache, progress=progress, extra=outside)
    n = len(emb.files)
    if queries:
        exclude = torch.tensor(_rows_of(q_files, emb.files))
        missing = [p for p, row in zip(q_files, exclude.tolist()) if row < 0 and p not in outside]
        if missing:  # inside FOLDER but skipped as unreadable
            raise DataError(f"{what}: query image could not be read: {missing[0]}")
        q_feats = torch.zeros(len(q_files), emb.features.shape[1])
        inside = (exclude >= 0).nonzero().flatten()
        q_feats[inside] = emb.features[exclude[inside]]
        extra_row = {p: j for j, p in enumerate(outside)}
        for i in (exclude < 0).nonzero().flatten().tolist():
            q_feats[i] = emb.extra[extra_row[q_files[i]]]
    else:
        if n_queries > n:
            raise ValueError(f"{what}: --n-queries {n_queries} is more than the {n} images in {folder}")
        gen = torch.Generator().manual_seed(seed)
        exclude = torch.randperm(n, generator=gen)[:n_queries]
        q_files = [emb.files[i] for i in exclude.tolist()]
        q_feats = emb.features[exclude]
    available = n - int((exclude >= 0).any())
    if k > available:
        raise ValueError(f"{what}: --k {k} is more than the {available} other images in {folder}")
    sims, idx = nearest(emb.features, q_feats, k, exclude)

    def label(row: int) -> str | None:
        return None if emb.labels is None or row < 0 else emb.classes[int(emb.labels[row])]

    result = {"encoder": str(source), "folder": str(folder), "k": k, "seed": seed, "queries": [
        {"file": _rel(emb, q_files[i]), "label": label(int(exclude[i])),
         "neighbours": [{"file": _rel(emb, emb.files[j]), "similarity": round(float(s), 6), "label": label(j)}
                        for s, j in zip(sims[i].tolist(), idx[i].tolist())]}
        for i in range(len(q_files))]}
    _draw_neighbors(out, emb, q_files, result, idx)
    json_path = out.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
    return {**result, "out": str(out), "json": str(json_path), "n": n, "hit": emb.hit, "skipped": emb.skipped}


def _draw_neighbors(out: Path, emb: Embedded, q_files: list[Path], result: dict, idx: torch.Tensor) -> None:
    plt = _pyplot()
    rows, cols = len(q_files), idx.shape[1] + 1
    width, height = cols * CELL, rows * CELL
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    # one CELL x CELL pixel box per image: a 4 px margin around it, 16 px below for its caption
    axes = [[fig.add_axes(((c * CELL + 4) / width, (height - (r + 1) * CELL + 18) / height,
                           (CELL - 8) / width, (CELL - 22) / height)) for c in range(cols)] for r in range(rows)]
    for r, q in enumerate(result["queries"]):
        ax = axes[r][0]
        ax.imshow(_thumb(q_files[r]), interpolation="nearest")
        ax.set_xlabel(("query" if q["label"] is None else q["label"])[:14], fontsize=7, fontweight="bold")
        for c, (nb, j) in enumerate(zip(q["neighbours"], idx[r].tolist()), start=1):
            ax = axes[r][c]
            ax.imshow(_thumb(emb.files[j]), interpolation="nearest")
            same = q["label"] is not None and nb["label"] == q["label"]
            colour = "black" if q["label"] is None else ("tab:green" if same else "tab:red")
            ax.set_xlabel(f"{nb['similarity']:.3f}", fontsize=7, color=colour)
    for ax in (a for row in axes for a in row):
        ax.set_xticks([])
        ax.set_yticks([])
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)


def map_picture(source: str | os.PathLike, folder: str | os.PathLike, out: str | os.PathLike, *,
                thumbnails: bool = False, seed: int = 0, batch_size: int = 256, device: str = "auto",
                workers: int | None = None, cache: bool = True, progress: bool = True) -> dict:
    """``byol map``: every image of ``folder`` as a point (``thumbnails``: up to MAX_MAP_THUMBS
    images, drawn with ``seed``, as small pictures) at the PCA of its L2-normalised representation
    [N, 2], coloured by class when the folder has class subfolders -> ``out`` (PNG) and
    ``<stem>.json`` ({method, classes, points: [{file, x, y, label}]}). Returns the JSON's content
    plus ``out``, ``json``, ``n``, ``hit``, ``skipped``."""
    what = "map"
    out = Path(out)
    _check_out(out, what)
    emb = embed_for_pictures(source, folder, what=what, batch_size=batch_size, device=device,
                             workers=workers, cache=cache, progress=progress)
    xy = pca_2d(emb.features)
    labels = None if emb.labels is None else emb.labels.tolist()
    result = {"encoder": str(source), "folder": str(folder), "method": "pca",
              "classes": emb.classes if labels is not None else [],
              "points": [{"file": _rel(emb, p), "x": round(float(x), 6), "y": round(float(y), 6),
                          "label": None if labels is None else emb.classes[labels[i]]}
                         for i, (p, (x, y)) in enumerate(zip(emb.files, xy))]}
    _draw_map(out, emb, xy, labels, thumbnails, seed)
    json_path = out.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
    return {**result, "out": str(out), "json": str(json_path), "n": len(emb.files), "hit": emb.hit,
            "skipped": emb.skipped}


def _draw_map(out: Path, emb: Embedded, xy: np.ndarray, labels: list[int] | None, thumbnails: bool,
              seed: int) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 8), dpi=DPI)
    cmap = plt.get_cmap("tab10" if len(emb.classes) <= 10 else "tab20")
    n = len(emb.files)
    size = max(4.0, min(30.0, 20000.0 / max(n, 1)))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color="tab:blue", alpha=0.7, linewidths=0)
    else:
        lab = np.asarray(labels)
        for c, name in enumerate(emb.classes):
            m = lab == c
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], s=size, color=cmap(c % cmap.N), alpha=0.7, linewidths=0,
                           label=name)
        legend = ax.legend(loc="best", fontsize=8, markerscale=max(1.0, 30.0 / size) ** 0.5, framealpha=0.9)
        for handle in legend.legend_handles:
            handle.set_alpha(1)
    if thumbnails:
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:MAX_MAP_THUMBS].sort().values
        for i in pick.tolist():
            img = _thumb(emb.files[i])
            box = OffsetImage(img, zoom=20 / max(img.shape[:2]))  # 20 pixels across
            frame = {"edgecolor": cmap(labels[i] % cmap.N) if labels is not None else "grey", "lw": 1}
            ax.add_artist(AnnotationBbox(box, (xy[i, 0], xy[i, 1]), frameon=True, pad=0.05, bboxprops=frame))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"{n} images, PCA of the representations y")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
