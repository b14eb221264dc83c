"""The pretraining loop's monitors, in one object the loop calls at three points:

    after_step(step, outputs, labels)   every step, with the step's ForwardOutput: the online
                                        linear classifier's step; the effective ranks every
                                        eval.collapse_every steps
    log_values(step, stats)             when the loop logs: accuracy, ranks, the collapse flag
    evaluate(model)                     kNN (+ online classifier) on the held-out split

None of them touches the encoder: the classifier reads y.detach(), evaluation runs in eval mode
under no_grad and leaves the global RNG stream as it found it (tests/test_monitor.py trains one
seed with and without monitors and compares the encoders bitwise).
"""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from byol import distributed
from byol.config import Config
from byol.eval.diagnostics import CollapseDetector, OnlineLinear, collapse_stats, monitor_eval
from byol.models.byol import ForwardOutput
from byol.train.rundir import MetricsLogger, write_json


def make_probe(cfg: Config, data, feature_dim: int, device: torch.device) -> OnlineLinear | None:
    """The online linear classifier when eval.online_linear is on and the images are labelled."""
    classes = getattr(data.source, "classes", None) or []
    if not cfg.eval.online_linear or getattr(data.source, "labels", None) is None or len(classes) < 2:
        return None
    return OnlineLinear(feature_dim, len(classes), lr=cfg.eval.online_linear_lr,
                        seed=cfg.train.seed).to(device)


class Monitors:
    def __init__(self, cfg: Config, state, data, device: torch.device, workers: int) -> None:
        self.cfg, self.state, self.data, self.device, self.workers = cfg, state, data, device, workers
        self.probe: OnlineLinear | None = state.probe
        self.detector = CollapseDetector(cfg.eval.collapse_threshold, state.collapsed_at)
        self._ranks: dict[str, torch.Tensor] = {}

    def wants_row(self, step: int) -> bool:
        """A step whose diagnostics must reach the log even off the log_every grid."""
        return step % self.cfg.eval.collapse_every == 0

    def after_step(self, step: int, outputs: ForwardOutput, labels: torch.Tensor) -> None:
        if self.probe is not None:
            self.probe.train_step(outputs.representation, labels.to(self.device, non_blocking=True))
        if self.wants_row(step):
            stats = collapse_stats(outputs.representation, outputs.projection, with_std=False)
            self._ranks = {"z_rank": stats["z_rank"], "y_rank": stats["y_rank"]}

    def log_values(self, step: int, row: dict) -> dict:
        """Values to add to the log row at ``step`` (reads device tensors: the loop's one sync)."""
        out = {k: float(v) for k, v in self._ranks.items()}
        self._ranks = {}
        accuracy = self.probe.take_accuracy() if self.probe is not None else None
        if accuracy is not None:
            out["online_linear_top1"] = accuracy
        first = self.detector.collapsed_at is None
        collapsed = self.detector.update(step, row["z_std"])
        out["collapsed"] = int(collapsed)
        if collapsed and first and distributed.is_main():  # once per run, on stderr
            self.state.collapsed_at = step
            tqdm.write(f"warning: step {step}: the projections have collapsed (z_std {row['z_std']:.3g} "
                       f"< eval.collapse_threshold {self.detector.threshold:g}); BYOL is not learning",
                       file=sys.stderr)
        return out

    @property
    def collapsed_at(self) -> int | None:
        return self.detector.collapsed_at

    def can_evaluate(self) -> bool:
        return self.data.bank is not None

    def due(self, epoch: int, last_epoch: int) -> bool:
        """kNN every eval.knn_every epochs, except the last when eval.final_knn covers it."""
        every = self.cfg.eval.knn_every
        last_covered = epoch == last_epoch and self.cfg.eval.final_knn
        return self.can_evaluate() and every > 0 and epoch % every == 0 and not last_covered

    def evaluate(self, model) -> dict:
        e = self.cfg.eval
        return monitor_eval(
            model.encoder, self.data.bank, self.data.test, num_classes=self.data.num_classes,
            k=e.knn_k, temperature=e.knn_temperature, probe=self.probe, batch_size=e.batch_size,
            device=self.device, workers=self.workers, progress=False,
        )


def progress_postfix(row: dict, lr: float, tau: float) -> dict:
    post = {"loss": f"{row['loss']:.4f}", "z_std": f"{row['z_std']:.2f}", "lr": f"{lr:.3g}",
            "tau": f"{tau:.4f}", "img_s": f"{row['images_per_s']:.0f}"}
    if "online_linear_top1" in row:
        post["lin"] = f"{row['online_linear_top1']:.1f}%"
    if row.get("collapsed"):
        post["status"] = "COLLAPSED"
    return post


def val_row(out: dict) -> dict:
    return {k: v for k, v in out.items() if k.startswith("val_")}


def final_eval(cfg, state, monitors, run_dir, result) -> None:
    """Held-out kNN (eval/knn.json) and online classifier (eval/online_linear.json) at the end."""
    out = monitors.evaluate(state.model)
    result.knn = {"top1": out["val_knn_top1"], "top5": out["val_knn_top5"], "k": cfg.eval.knn_k,
                  "temperature": cfg.eval.knn_temperature, "n_bank": out["n_bank"], "n_test": out["n_test"]}
    write_json(run_dir / "eval" / "knn.json", {**result.knn, "step": state.step})
    if "val_online_linear_top1" in out:
        result.online_linear = {"top1": out["val_online_linear_top1"], "top5": out["val_online_linear_top5"],
                                "n_test": out["n_test"], "step": state.step,
                                "note": "linear classifier trained online on detached representations"}
        write_json(run_dir / "eval" / "online_linear.json", result.online_linear)
    logger = MetricsLogger(run_dir)
    logger.log(state.step, {"epoch": state.epoch, **val_row(out)})
    logger.close()
