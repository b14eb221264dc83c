"""Step benchmark: BYOL training steps on the CPU, ours vs lightly vs byol-pytorch vs a minimal loop.

    python benchmarks/step.py --impl ours --batch 128 --steps 10 --warmup 3 --threads 2
    python benchmarks/step.py --compare --batches 32 128 --rounds 3 --threads 2 --steps 10 --warmup 3

One implementation per process (``--impl``) prints one JSON line: images/s, median and min step
time, peak RSS. ``--compare`` runs each implementation in a fresh subprocess, alternating
A B C D A B C D ... so that load from other processes spreads over all of them, and ends with a
line of ratios ours/other (>1 means ours is faster) per batch, min and median over rounds.

What is timed: one optimisation step on two fixed random views [B, 3, 32, 32] (augmentation is
excluded for every implementation). The encoder is the same module for all four, our
``byol.models.backbones.resnet("resnet18", cifar_stem=True)`` (torchvision BasicBlocks, 3x3/1
stem, no max-pool, D=512); heads are 512 -> 4096 -> 256 (projector) and 256 -> 4096 -> 256
(predictor). Everything else is each implementation at its own defaults:

- ours: byol.models.byol.BYOL + byol.optim.build_optimizer("lars") + byol.train.step.train_step
  with the ``train`` section's defaults, as ``byol pretrain`` runs on the CPU: channels_last,
  precision auto (bf16 autocast on CPUs with native bf16, else fp32), glibc allocator tuning.
- ours_fp32: the same with train.precision=fp32 (what the bf16 default adds, in the same run).
- lightly 1.6: the structure of its examples/pytorch/byol.py (BYOLProjectionHead,
  BYOLPredictionHead, deactivate_requires_grad, update_momentum, NegativeCosineSimilarity,
  cosine_schedule), SGD lr 0.06 as the example.
- byol_pytorch 0.9.1: lucidrains' ``BYOL(net, image_size=32, hidden_layer=-1, ...)`` with
  ``augment_fn=lambda x: x``, Adam lr 3e-4 as its README. It takes ONE batch and makes both views
  with its augment functions, so here both views are the same tensor (same compute); it runs
  the two views as one concatenated batch of 2B.
- minimal: a hand-written BYOL step: plain per-parameter loops (no foreach) for LARS and the EMA.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("ours", "ours_fp32", "lightly", "byol_pytorch", "minimal")
SIZE, HIDDEN, OUT, FEATURES = 32, 4096, 256, 512
TOTAL_STEPS = 1000  # length of the (pretend) run the lr/tau schedules are evaluated on
INSTALL = "install it in a separate venv: pip install lightly==1.6.0 byol-pytorch==0.9.1"


def encoder() -> nn.Module:
    """The shared encoder f: our CIFAR-stem ResNet-18, images [B,3,32,32] -> y [B,512]."""
    from byol.models.backbones import resnet
    return resnet("resnet18", cifar_stem=True)


def build_ours(batch: int, channels_last: bool = True, precision: str | None = None,
               malloc_tuning: bool | None = None):
    """Our step as ``byol pretrain`` runs it on the CPU: LARS (default optim section) and the
    train section's defaults (channels_last, precision, allocator), unless overridden."""
    from byol.config.sections import Method, Optim, Train
    from byol.models.byol import BYOL
    from byol.models.heads import MLPHead
    from byol.optim import build_optimizer, cosine_tau, scaled_lr, warmup_cosine_lr
    from byol.train.runtime import resolve_precision, tune_cpu_allocator
    from byol.train.step import train_step

    oc, mc, tc = Optim(), Method(), Train()
    precision = resolve_precision(precision or tc.precision, torch.device("cpu"))
    if tc.malloc_tuning if malloc_tuning is None else malloc_tuning:
        tune_cpu_allocator()
    model = BYOL(encoder(), FEATURES, projector=MLPHead(FEATURES, HIDDEN, OUT), predictor=MLPHead(OUT, HIDDEN, OUT))
    fmt = torch.channels_last if channels_last else torch.contiguous_format  # train.channels_last
    model = model.to(memory_format=fmt).train()
    opt = build_optimizer(oc.name, model, lr=0.0, weight_decay=oc.weight_decay, momentum=oc.momentum,
                          trust_coefficient=oc.trust_coefficient)
    peak = scaled_lr(oc.base_lr, batch)

    def step(v1, v2, i):
        v1, v2 = (v.contiguous(memory_format=fmt) for v in (v1, v2))
        lr = warmup_cosine_lr(i, TOTAL_STEPS, TOTAL_STEPS // 10, peak)
        train_step(model, opt, v1, v2, lr=lr, tau=cosine_tau(i, TOTAL_STEPS, mc.tau_base),
                   precision=precision)
    step.precision = precision  # for the JSON record
    return step


def build_lightly(batch: int):
    """lightly's examples/pytorch/byol.py, with 4096-wide heads and our encoder."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    class LightlyBYOL(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(FEATURES, HIDDEN, OUT)
            self.prediction_head = BYOLPredictionHead(OUT, HIDDEN, OUT)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    model = LightlyBYOL(encoder()).train()
    criterion = NegativeCosineSimilarity()
    opt = torch.optim.SGD(model.parameters(), lr=0.06)

    def step(x0, x1, i):
        m = cosine_schedule(i, TOTAL_STEPS, 0.996, 1)
        update_momentum(model.backbone, model.backbone_momentum, m=m)
        update_momentum(model.projection_head, model.projection_head_momentum, m=m)
        p0, z0 = model(x0), model.forward_momentum(x0)
        p1, z1 = model(x1), model.forward_momentum(x1)
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def build_byol_pytorch(batch: int):
    """lucidrains' BYOL wrapper with augmentation disabled; Adam 3e-4 as its README."""
    from byol_pytorch import BYOL as LucidBYOL

    learner = LucidBYOL(encoder(), image_size=SIZE, hidden_layer=-1, projection_size=OUT,
                        projection_hidden_size=HIDDEN, augment_fn=lambda x: x).train()
    opt = torch.optim.Adam(learner.parameters(), lr=3e-4)

    def step(v1, v2, i):
        loss = learner(v1)  # both views come from its augment_fn: identity here
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()
    return step


def _mlp(d_in: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(inplace=True),
                         nn.Linear(HIDDEN, OUT, bias=False))


def build_minimal(batch: int):
    """Hand-written BYOL: online f,g,q; target deepcopy of f,g; LARS and EMA as plain loops."""
    online = nn.Sequential(encoder(), _mlp(FEATURES)).train()
    predictor = _mlp(OUT).train()
    target = copy.deepcopy(online).requires_grad_(False).train()
    params = [*online.parameters(), *predictor.parameters()]
    bufs = [torch.zeros_like(p) for p in params]
    lr, wd, mu, eta = 0.2 * batch / 256, 1.5e-6, 0.9, 1e-3

    def loss_fn(p, z):
        return (2 - 2 * F.cosine_similarity(p, z, dim=-1)).mean()

    def step(v1, v2, i):
        z1, z2 = online(v1), online(v2)
        p1, p2 = predictor(z1), predictor(z2)
        with torch.no_grad():
            t1, t2 = target(v1), target(v2)
        loss = loss_fn(p1, t2) + loss_fn(p2, t1)
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p, buf in zip(params, bufs):
                g = p.grad
                if p.ndim > 1:  # weights: decay + trust ratio; biases and BN params: neither
                    g = g + wd * p
                    wn, gn = p.norm(), g.norm()
                    if wn > 0 and gn > 0:
                        g = g * (eta * wn / gn)
                buf.mul_(mu).add_(g)
                p.sub_(buf, alpha=lr)
            tau = 0.996
            for pt, po in zip(target.parameters(), online.parameters()):
                pt.mul_(tau).add_(po, alpha=1 - tau)
    return step


BUILDERS = {"lightly": build_lightly, "byol_pytorch": build_byol_pytorch, "minimal": build_minimal}
MODULES = {"lightly": "lightly", "byol_pytorch": "byol_pytorch"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cpus, {platform.system()}"


def run_one(impl: str, batch: int, steps: int, warmup: int, threads: int, seed: int,
            channels_last: bool = True, malloc_tuning: bool = True) -> dict:
    """Build ``impl``, run warmup + timed steps on fixed random views, return the JSON record."""
    if impl in MODULES:
        import importlib.util
        if importlib.util.find_spec(MODULES[impl]) is None:
            raise SystemExit(f"step.py: --impl {impl}: package {MODULES[impl]!r} is not installed ({INSTALL})")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if impl.startswith("ours"):
        step = build_ours(batch, channels_last, "fp32" if impl == "ours_fp32" else None, malloc_tuning)
    else:
        step = BUILDERS[impl](batch)
    v1, v2 = torch.rand(batch, 3, SIZE, SIZE), torch.rand(batch, 3, SIZE, SIZE)
    for i in range(warmup):
        step(v1, v2, i)
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(v1, v2, i)
        times.append(time.perf_counter() - t0)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"impl": impl, "batch": batch, "threads": threads, "steps": steps, "warmup": warmup,
            "images_per_s": round(batch * steps / sum(times), 2),
            "step_ms_median": round(1000 * statistics.median(times), 1),
            "step_ms_min": round(1000 * min(times), 1), "peak_rss_mb": round(rss_kb / 1024, 1),
            "channels_last": channels_last if impl.startswith("ours") else False,
            "precision": getattr(step, "precision", "fp32"),
            "malloc_tuning": malloc_tuning if impl.startswith("ours") else False, "torch": torch.__version__,
            "machine": machine(), "load1_at_end": os.getloadavg()[0]}


def compare(args) -> None:
    """Fresh subprocess per run, implementations alternating; then ratios ours/other per batch."""
    results: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for batch in args.batches:
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--impl", impl, "--batch", str(batch),
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--threads", str(args.threads), "--seed", str(args.seed)]
                cmd += ["--no-channels-last"] if args.no_channels_last else []
                cmd += ["--no-malloc-tuning"] if args.no_malloc_tuning else []
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"step.py: {impl} batch {batch} failed: {proc.stderr.strip()[-500:]}")
                rec = json.loads(proc.stdout.strip().splitlines()[-1]) | {"round": r}
                print(json.dumps(rec), flush=True)
                results.setdefault((impl, batch), []).append(rec)
    ratios = {}
    for batch in args.batches:
        ours = results.get(("ours", batch), [])
        for other in (i for i in args.impls if i != "ours" and ours and (i, batch) in results):
            theirs = results[(other, batch)]
            ratios[f"ours/{other}@{batch}"] = {  # throughput ratios: > 1 means ours is faster
                "min_step": round(min(x["step_ms_min"] for x in theirs) / min(x["step_ms_min"] for x in ours), 3),
                "median_step": round(_median(theirs, "step_ms_median") / _median(ours, "step_ms_median"), 3),
                "images_per_s_median": round(_median(ours, "images_per_s") / _median(theirs, "images_per_s"), 3)}
    print(json.dumps({"ratios": ratios, "rounds": args.rounds, "threads": args.threads}))


def _median(records: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS)
    parser.add_argument("--compare", action="store_true", help="run all --impls in fresh processes")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-channels-last", action="store_true",
                        help="ours in NCHW (train.channels_last=false), as the others run")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="ours without the glibc allocator tuning (train.malloc_tuning=false)")
    args = parser.parse_args()
    for name in ("batch", "steps", "threads", "rounds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.compare:
        compare(args)
    elif args.impl:
        print(json.dumps(run_one(args.impl, args.batch, args.steps, args.warmup, args.threads, args.seed,
                                 channels_last=not args.no_channels_last,
                                 malloc_tuning=not args.no_malloc_tuning)))
    else:
        parser.error("give --impl NAME (one run) or --compare")


if __name__ == "__main__":
    main()
