"""The named grids of ``byol sweep``: the ablations of docs/method.md §7 and §8 as short runs.

Every cell is the ``demo`` config (the built-in shapes, a narrow ResNet-18) at 32 px and a fixed
length, :data:`SHORT`, plus the cell's own overrides; the user's overrides
(``data.path=...``, ``optim.epochs=...``) come last and apply to every cell. A grid changes one
thing at a time, so a cell's overrides are exactly what sets it apart.
"""
from __future__ import annotations

from dataclasses import dataclass

# Every cell: 8 epochs (200 steps on the demo data) of 32-px views evaluated at 32 px, not the
# demo's time budget (a cell is a fixed number of steps, the same on every machine), the kNN at
# random init (each cell's own "random network" baseline) and at the end, collapse diagnostics
# every 25 steps, no kNN during training and no online linear probe (not needed for the table;
# they cost time).
SHORT: dict[str, object] = {
    "optim.epochs": 8,
    "train.budget": None,
    "augment.size": 32,
    "augment.eval_size": None,
    "eval.initial_knn": True,
    "eval.final_knn": True,
    "eval.knn_every": 0,
    "eval.online_linear": False,
    "eval.collapse_every": 25,
    "train.log_every": 5,
    "train.checkpoint_every": 100,
}


@dataclass(frozen=True)
class Cell:
    label: str  # unique in its grid; the cell's run directory name
    overrides: dict[str, object]
    series: str | None = None  # grids plotted as lines (batch): the line this cell belongs to
    x: float | None = None  # and its position on the x axis


@dataclass(frozen=True)
class Grid:
    name: str
    question: str  # what the grid varies
    paper: str  # the finding it checks (docs/method.md §7, §8)
    cells: tuple[Cell, ...]
    x_label: str = ""

    def cell(self, label: str) -> Cell:
        return next(c for c in self.cells if c.label == label)


def _tau(value: float) -> Cell:
    # tau_base 0 and 1 are constants (the target is the online copy / never moves); the others
    # follow the paper's cosine schedule from tau_base to 1.
    schedule = "constant" if value in (0.0, 1.0) else "cosine"
    return Cell(f"tau_{value:g}", {"method.tau_base": value, "method.tau_schedule": schedule})


def _infonce(beta: float, predictor_and_target: bool) -> Cell:
    arms = ({"method.predictor": True, "method.target": "ema"} if predictor_and_target
            else {"method.predictor": False, "method.target": "online"})
    tag = "pred_target" if predictor_and_target else "no_pred_no_target"
    return Cell(f"{tag}_beta_{beta:g}", {"method.loss": "infonce", "method.beta": beta, **arms},
                series="predictor + target" if predictor_and_target else "neither", x=beta)


def _batch(method: str, batch: int) -> Cell:
    return Cell(f"{method}_b{batch}", {"method.name": method, "optim.batch_size": batch},
                series=method, x=batch)


GRIDS: dict[str, Grid] = {g.name: g for g in (
    Grid(
        "tau", "the target decay rate tau_base (docs/method.md §7)",
        "tau_base 1 (a fixed random target) 18.8% vs 1.4% for the random network; 0.99 72.5%; "
        "0.9 68.4%; 0 (target = online copy) 0.3%, collapse.",
        tuple(_tau(t) for t in (0.0, 0.9, 0.99, 0.996, 1.0)),
    ),
    Grid(
        "predictor", "the predictor and the target network (docs/method.md §7, SimSiam)",
        "Without negatives only predictor + target learns; without a predictor, tau = 0 "
        "collapses. SimSiam (predictor, stop-gradient, no EMA) learns; without the "
        "stop-gradient it collapses.",
        (
            Cell("byol", {}),
            Cell("no_predictor", {"method.predictor": False}),
            Cell("tau_0", {"method.tau_base": 0.0, "method.tau_schedule": "constant"}),
            Cell("no_predictor_tau_0", {"method.predictor": False, "method.tau_base": 0.0,
                                        "method.tau_schedule": "constant"}),
            Cell("simsiam_stopgrad", {"method.target": "online_stopgrad"}),
            Cell("no_stopgrad", {"method.target": "online"}),
        ),
    ),
    Grid(
        "augmentations", "the augmentation set (docs/method.md §7)",
        "BYOL: full 72.5, no grayscale 70.3, crop + colour 70.7, no colour 63.4, crop + blur "
        "61.1, crop only 59.4: removing colour hurts far more than removing grayscale.",
        tuple(Cell(a, {"augment.ablation": a}) for a in
              ("full", "no_grayscale", "crop_colour", "no_colour", "crop_blur", "crop_only")),
    ),
    Grid(
        "normalization", "normalisation in the heads and the backbone (docs/method.md §8)",
        "BN in both MLPs 57.7, projector only 55.3, predictor only 48.0, no normalisation in "
        "the heads 28.3, LayerNorm 29.4, random 28.8 (STL-10); GroupNorm + weight "
        "standardisation 73.9 vs BN 74.3 and the BN-free data-dependent init 65.7 (ImageNet).",
        (
            Cell("bn", {}),
            Cell("projector_bn_only", {"model.predictor_norm": "none"}),
            Cell("predictor_bn_only", {"model.head_norm": "none", "model.predictor_norm": "bn"}),
            Cell("heads_ln", {"model.head_norm": "ln"}),
            Cell("heads_none", {"model.head_norm": "none"}),
            Cell("no_norm", {"model.head_norm": "none", "model.backbone_norm": "none"}),
            Cell("gn_ws", {"model.backbone_norm": "gn_ws"}),
            Cell("gn_ws_heads_ln", {"model.backbone_norm": "gn_ws", "model.head_norm": "ln"}),
            Cell("bn_free_init", {"model.bn_free_init": True}),
            Cell("bn_free_encoder", {"model.bn_free_init": True, "model.bn_free_heads": False}),
        ),
    ),
    Grid(
        "batch", "the batch size, BYOL vs SimCLR, lr scaled with the batch (docs/method.md §7)",
        "BYOL 72.5 / 71.8 / 69.6 / 59.7 at 4096 / 256 / 128 / 64 falls far less than SimCLR "
        "(67.9 at 4096) as the batch shrinks.",
        tuple(_batch(m, b) for m in ("byol", "simclr") for b in (32, 64, 128, 256)),
        x_label="batch size",
    ),
    Grid(
        "objective", "the generalized InfoNCE: negative weight beta, with and without predictor "
                     "+ target (docs/method.md §7)",
        "Without negatives (beta = 0) only predictor + target learns; with beta = 1 both learn "
        "(SimCLR without them).",
        tuple(_infonce(b, pt) for pt in (True, False) for b in (0.0, 0.5, 1.0)),
        x_label="beta (weight of the negatives)",
    ),
)}
