"""What pretraining watches without touching the encoder: collapse diagnostics, an online linear
classifier on detached representations, and a kNN monitor on the held-out split.

- ``collapse_stats``: the per-dimension std of L2-normalised projections times sqrt(d) (docs/method.md §8:
  about 1 when the projections spread over the sphere, 0 when every image maps to one point) and the
  effective rank of the projections z and representations y of a batch.
- ``OnlineLinear``: as the official implementation, a linear classifier trained beside BYOL on
  ``y.detach()`` of the first view, with its own optimiser: a running measure of linear separability
  that never sends a gradient into the encoder.
- ``monitor_eval``: kNN of held-out images against the training split, and the online classifier's
  accuracy on the same held-out features (one feature extraction for both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from byol.eval.features import extract_features
from byol.eval.knn import accuracy, knn_predict
from byol.models.byol import normalized_std
from byol.seeding import seeded


@torch.no_grad()
def effective_rank(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Effective rank exp(H(p)), p_k = s_k / sum(s) of the singular values s of ``x`` [B, d]
    (Roy & Vetterli 2007; "RankMe", Garrido et al. 2023). 1 when every row is the same vector,
    min(B, d) when the singular values are equal. Rows are not centred: a collapse to a constant
    vector then reads 1, not an undefined 0/0. -> scalar tensor."""
    s = torch.linalg.svdvals(x.float())
    p = s / (s.sum() + eps) + eps
    return torch.exp(-(p * p.log()).sum())


@torch.no_grad()
def collapse_stats(representation: torch.Tensor, projection: torch.Tensor,
                   with_std: bool = True) -> dict[str, torch.Tensor]:
    """y [B, D], z [B, d] -> {"z_std", "z_rank", "y_rank"} as device tensors (no host sync);
    ``with_std=False`` leaves out z_std (the training step already computes it)."""
    out = {"z_std": normalized_std(projection)} if with_std else {}
    out.update(z_rank=effective_rank(projection), y_rank=effective_rank(representation))
    return out


class CollapseDetector:
    """Flags collapse when the normalised projection std stays below ``threshold`` for
    ``patience`` consecutive readings (healthy runs stay near 0.3-1; a collapsed one goes to 0;
    one noisy batch is not a collapse). The first step it was confirmed is kept, so a resumed
    run still reports it."""

    def __init__(self, threshold: float, collapsed_at: int | None = None, patience: int = 2) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"eval.collapse_threshold must be in (0, 1), got {threshold!r}")
        if patience < 1:
            raise ValueError(f"collapse patience must be >= 1, got {patience!r}")
        self.threshold, self.patience = threshold, patience
        self.collapsed_at = collapsed_at
        self._below = 0

    def update(self, step: int, z_std: float) -> bool:
        """True while collapsed: this reading and the ``patience - 1`` before it were below the
        threshold. Records the first such step."""
        self._below = self._below + 1 if z_std < self.threshold else 0
        collapsed = self._below >= self.patience
        if collapsed and self.collapsed_at is None:
            self.collapsed_at = step
        return collapsed


class OnlineLinear(nn.Module):
    """Linear classifier on detached representations [B, D] -> logits [B, C], trained every step.

    A BatchNorm without affine parameters standardises the features first, so one learning rate
    works whatever the scale of y (it drifts during pretraining). Adam, since this is a monitor
    and must track a moving target without tuning. Its parameters are built from a private
    generator: adding the monitor does not change the global RNG stream the run draws from.
    """

    def __init__(self, feature_dim: int, num_classes: int, lr: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"OnlineLinear needs >= 2 classes, got {num_classes}")
        self.norm = nn.BatchNorm1d(feature_dim, affine=False)
        with seeded(seed):  # nn.Linear initialises from the global (CPU) RNG
            self.fc = nn.Linear(feature_dim, num_classes)
        self.optimizer = torch.optim.Adam(self.fc.parameters(), lr=lr)
        self.register_buffer("correct", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(y.float()))

    def train_step(self, y: torch.Tensor, labels: torch.Tensor) -> None:
        """One Adam step on (y.detach() [B, D], labels [B]); rows labelled -1 (unlabelled) are
        ignored. Correct predictions accumulate on the device (no host sync per step) until
        ``take_accuracy``; the counters are buffers, so a resume continues them exactly."""
        self.train()
        logits = self(y.detach())
        labelled = labels >= 0
        # mean over the labelled rows without a host sync; a batch with none gives a zero loss
        loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / labelled.sum().clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.correct += ((logits.argmax(1) == labels) & labelled).sum()
            self.seen += labelled.sum()

    def take_accuracy(self) -> float | None:
        """Running accuracy (percent) since the last call, then reset; None if nothing was seen."""
        seen = int(self.seen)
        out = 100.0 * float(self.correct) / seen if seen else None
        self.correct.zero_()
        self.seen.zero_()
        return out

    def full_state_dict(self) -> dict:
        """Module and optimiser state (tensors and plain values: weights_only-loadable)."""
        return {"module": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_full_state_dict(self, sd: dict) -> None:
        self.load_state_dict(sd["module"])
        self.optimizer.load_state_dict(sd["optimizer"])

    def set_lr(self, lr: float) -> None:
        """The config's lr wins over a checkpoint's (eval.* may change on resume)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def monitor_eval(encoder: nn.Module, bank, test, *, num_classes: int, k: int, temperature: float,
                 probe: OnlineLinear | None, batch_size: int, device, workers: int,
                 progress: bool = False) -> dict:
    """Held-out kNN (bank = training split) and the online classifier's held-out accuracy.

    -> {"val_knn_top1", "val_knn_top5", "n_bank", "n_test"} (+ "val_online_linear_top1", "_top5").
    The encoder and probe run in eval mode (BN running statistics, nothing updated); the global
    RNG stream is left as it was, so a run with monitors trains exactly as one without.
    """
    kw = dict(batch_size=batch_size, device=device, workers=workers, progress=progress)
    with seeded():  # whatever extraction draws, the run's stream is left as it was
        fb, lb = extract_features(encoder, bank, desc="kNN bank", **kw)
        ft, lt = extract_features(encoder, test, desc="kNN test", **kw)
    scores = knn_predict(fb, lb, ft, num_classes=num_classes, k=k, temperature=temperature)
    out = {"val_knn_top1": accuracy(scores, lt, 1), "val_knn_top5": accuracy(scores, lt, 5),
           "n_bank": len(lb), "n_test": len(lt)}
    if probe is not None:
        was_training = probe.training
        probe.eval()
        with torch.no_grad():
            logits = torch.cat([probe(chunk.to(device)).cpu() for chunk in ft.split(4096)])
        probe.train(was_training)
        out["val_online_linear_top1"] = accuracy(logits, lt, 1)
        out["val_online_linear_top5"] = accuracy(logits, lt, 5)
    return out
