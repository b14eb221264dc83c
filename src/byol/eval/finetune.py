"""The supervised protocols of docs/method.md §5 on a pretrained run: the paper's linear evaluation and
semi-supervised fine-tuning on a class-balanced fraction of the labels.

    byol eval linear runs/NAME --protocol paper            # frozen encoder, 80 epochs
    byol eval finetune runs/NAME --labels-fraction 0.01    # 1% of the labels, end to end

Label subsets are drawn from the TRAIN split only (so they never hold a test image), per class
from a seeded generator, and saved as a list of sample ids (file paths, or ``shapes:<i>``):
``--labels-file`` reuses one, so runs on different checkpoints see the same labelled images.
``random_init=True`` evaluates an untrained encoder of the same architecture: the floor that
shows what pretraining adds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from byol.config import Config
from byol.data.errors import DataError
from byol.data.sources import Transformed
from byol.data.transforms import make_eval_transform
from byol.data.workers import default_workers
from byol.eval.commands import eval_encoder, load_checkpoint_run, write_result
from byol.eval.data import EvalSplits, eval_splits, sample_ids, sample_labels
from byol.eval.supervised import train_classifier, train_transform
from byol.optim.schedules import scaled_lr
from byol.train.runtime import resolve_device

# Fine-tuning lr (absolute, not scaled by the batch): the low end of the paper's 0.005-0.1 sweep,
# because with 1-10% of the labels a larger step wipes out pretrained features before the
# freshly initialised head has learnt anything useful from them.
FINETUNE_LR = 0.01


def label_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """Class-balanced indices into ``labels``: per class c, round(fraction * n_c) images (at
    least 1), from a generator ``default_rng([seed, c])`` of its own so that one class's pick
    does not depend on the others. Sorted; the same for the same (labels, fraction, seed)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"labels fraction must be in (0, 1], got {fraction!r}")
    labels_arr = np.asarray(labels, dtype=np.int64)
    if labels_arr.size and labels_arr.min() < 0:
        raise DataError("label subsets need labelled images (found label -1)")
    chosen: list[int] = []
    for c in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == c)
        k = min(max(round(fraction * len(idx)), 1), len(idx))
        chosen.extend(np.random.default_rng([seed, int(c)]).permutation(idx)[:k].tolist())
    return sorted(chosen)


def save_subset(path: str | Path, ids: list[str]) -> None:
    """Write a label subset as text, one sample id per line (``sample_ids`` names)."""
    bad = next((i for i in ids if "\n" in i or "\r" in i), None)
    if bad is not None:
        raise DataError(f"cannot save the label subset: sample id {bad!r} holds a line break")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def load_subset(path: str | Path, available_ids: list[str]) -> list[int]:
    """Read a subset written by ``save_subset`` -> sorted indices into ``available_ids``.
    DataError naming the file when it is missing, empty or names an id not available."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--labels-file: no such file: {path}")
    ids = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not ids:
        raise DataError(f"--labels-file: {path} lists no samples")
    position = {sid: i for i, sid in enumerate(available_ids)}
    missing = next((sid for sid in ids if sid not in position), None)
    if missing is not None:
        raise DataError(f"--labels-file: {path} names {missing!r}, which is not in the training split")
    return sorted({position[sid] for sid in ids})


def _check(what: str, *rules: tuple[bool, str, str, object]) -> None:
    for ok, flag, rule, value in rules:
        if not ok:
            raise ValueError(f"{what}: {flag} must be {rule}, got {value!r}")


def _common_rules(epochs: int, batch_size: int, seed: int,
                  min_batch: int) -> list[tuple[bool, str, str, object]]:
    return [(epochs >= 1, "--epochs", ">= 1", epochs),
            (batch_size >= min_batch, "--batch-size", f">= {min_batch}", batch_size),
            (seed >= 0, "--seed", ">= 0", seed)]


def _prepare(run: str, train: str | None, test: str | None, what: str, device: str,
             random_init: bool, seed: int):
    """-> (LoadedRun, encoder on the device, EvalSplits, device)."""
    loaded = load_checkpoint_run(run)
    dev = resolve_device(device, what="--device")
    splits = eval_splits(loaded.cfg, train, test, what=what, n_train=loaded.n_train)
    return loaded, eval_encoder(loaded, random_init, seed, dev), splits, dev


def _augmented(cfg: Config, raw_train) -> Transformed:
    return Transformed(raw_train, train_transform(cfg.augment.size, cfg.augment.mean, cfg.augment.std))


def _sources(splits: EvalSplits) -> dict:
    return {"train": splits.train_source, "test": splits.test_source}


def paper_linear_command(run: str, *, train: str | None = None, test: str | None = None,
                         epochs: int = 80, batch_size: int = 256, base_lr: float = 0.2,
                         device: str = "auto", workers: int | None = None, seed: int = 0,
                         random_init: bool = False) -> dict:
    """Linear evaluation of docs/method.md §5: frozen encoder (BN in eval mode), crop + flip while
    training, centre crop at test, SGD Nesterov 0.9, lr = base_lr * batch / 256 cosine, no
    weight decay. Writes run_dir/eval/linear_paper_<tag>.json."""
    what = "eval linear --protocol paper"
    _check(what, *_common_rules(epochs, batch_size, seed, 1), (base_lr > 0, "--base-lr", "> 0", base_lr))
    loaded, encoder, splits, dev = _prepare(run, train, test, what, device, random_init, seed)
    cfg = loaded.cfg
    batch = min(batch_size, len(splits.train))
    lr = scaled_lr(base_lr, batch)
    out = train_classifier(
        encoder, splits.num_classes, _augmented(cfg, splits.train),
        Transformed(splits.test, make_eval_transform(cfg.augment)), freeze_encoder=True,
        epochs=epochs, batch_size=batch, lr=lr, weight_decay=0.0, device=dev,
        workers=default_workers(workers, dev), seed=seed, progress=True, desc="linear",
    )
    out.update(protocol="linear_paper", base_lr=base_lr, num_classes=splits.num_classes,
               checkpoint=str(loaded.checkpoint), step=loaded.step, sources=_sources(splits),
               random_init=random_init, seed=seed)
    return write_result(loaded, f"linear_paper_{splits.tag}", out, random_init)


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}"


def _labelled(splits: EvalSplits, fraction: float, labels_file: str | None, seed: int,
              save_dir: Path) -> tuple[list[int], Path]:
    """The label subset (indices into the train split) and the file that lists it: ``labels_file``
    when given, else a fresh class-balanced draw saved as labels_<pct>pct_seed<seed>_<tag>.txt."""
    train_ids = sample_ids(splits.train)
    if labels_file is not None:
        idx, path = load_subset(labels_file, train_ids), Path(labels_file)
    else:
        idx = label_subset(sample_labels(splits.train), fraction, seed)
        path = save_dir / f"labels_{_pct(fraction)}pct_seed{seed}_{splits.tag}.txt"
        save_subset(path, [train_ids[i] for i in idx])
    # Drawn from the train split only, so disjoint by construction; this catches a --train and a
    # --test folder that share images.
    shared = {train_ids[i] for i in idx} & set(sample_ids(splits.test))
    if shared:
        raise DataError(f"eval finetune: {len(shared)} labelled images are also test images, "
                        f"e.g. {sorted(shared)[0]} (--train and --test must not overlap)")
    return idx, path


def finetune_command(run: str, *, labels_fraction: float = 0.1, labels_file: str | None = None,
                     train: str | None = None, test: str | None = None, epochs: int = 30,
                     batch_size: int = 256, lr: float = FINETUNE_LR, weight_decay: float = 0.0,
                     device: str = "auto", workers: int | None = None, seed: int = 0,
                     random_init: bool = False) -> dict:
    """Semi-supervised fine-tuning of docs/method.md §5: encoder + linear head trained end to end
    (SGD Nesterov 0.9, cosine lr) on a class-balanced ``labels_fraction`` of the train split,
    or on the subset listed in ``labels_file`` (then ``labels_fraction`` is not used).
    Writes run_dir/eval/finetune_<pct>pct_<tag>.json and the subset list beside it."""
    what = "eval finetune"
    # BatchNorm in train mode cannot normalise a batch of one image
    _check(what, *_common_rules(epochs, batch_size, seed, 2),
           (0 < labels_fraction <= 1, "--labels-fraction", "in (0, 1]", labels_fraction),
           (lr > 0, "--lr", "> 0", lr), (weight_decay >= 0, "--weight-decay", ">= 0", weight_decay))
    loaded, encoder, splits, dev = _prepare(run, train, test, what, device, random_init, seed)
    cfg = loaded.cfg
    save_dir = loaded.run_dir / "eval" if loaded.run_dir is not None else loaded.checkpoint.parent
    idx, subset_file = _labelled(splits, labels_fraction, labels_file, seed, save_dir)
    if len(idx) < 2:
        raise DataError(f"{what}: fine-tuning needs >= 2 labelled images (BatchNorm), got {len(idx)}")
    fraction = len(idx) / len(splits.train)
    out = train_classifier(
        encoder, splits.num_classes, _augmented(cfg, Subset(splits.train, idx)),
        Transformed(splits.test, make_eval_transform(cfg.augment)), freeze_encoder=False,
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, device=dev,
        workers=default_workers(workers, dev), seed=seed, progress=True, desc="fine-tune",
    )
    out.update(protocol="finetune", n_labelled=len(idx), labelled_fraction=fraction,
               labels_fraction=None if labels_file is not None else labels_fraction,
               num_classes=splits.num_classes, weight_decay=weight_decay, checkpoint=str(loaded.checkpoint),
               step=loaded.step,
               sources=_sources(splits), subset_file=str(subset_file), random_init=random_init,
               seed=seed)
    pct = _pct(labels_fraction if labels_file is None else round(fraction, 4))
    return write_result(loaded, f"finetune_{pct}pct_{splits.tag}", out, random_init)
