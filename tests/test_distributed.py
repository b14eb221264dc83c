"""DDP with the gloo backend on the CPU, 2 processes (README "Many GPUs and nodes").

- one DDP step with global batch B == one single-process step with batch B (a model without
  batch statistics, so the per-rank halves see exactly what one process sees);
- a ResNet (batch norm) pretrains under 2 processes, only rank 0 writes, and a stop + resume
  under 2 processes continues exactly.
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from byol import BYOL, LARS, distributed, param_groups
from byol.config import load_config
from byol.data.sampler import ResumableSampler
from byol.losses import InfoNCELoss
from byol.models import MLPHead, NegativeQueue, OnlineTarget
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from byol.train.step import train_step
from conftest import TINY

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


# BYOL; SimCLR's NT-Xent with negatives from both views of the *global* batch; MoCo's queue.
# Each kind: the model's parts, given the gathers (None in one process).
KINDS = {
    "byol": lambda batch, keys: {},
    "simclr": lambda batch, keys: dict(target=OnlineTarget(),
                                       loss=InfoNCELoss(alpha=0.5, beta=1.0, gather=batch)),
    "moco": lambda batch, keys: dict(loss=InfoNCELoss(alpha=0.5, beta=1.0, gather=batch),
                                     queue=NegativeQueue(24, 8, gather=keys)),  # 32 keys: 8 evicted
}


def _mlp_byol(kind: str = "byol") -> BYOL:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU())
    ddp = distributed.world_size() > 1
    projector = MLPHead(16, 32, 8, "none")
    predictor = MLPHead(8, 32, 8, "none") if kind == "byol" else nn.Identity()
    parts = KINDS[kind](distributed.gather_with_grad if ddp else None, distributed.gather if ddp else None)
    return BYOL(encoder, 16, projector=projector, predictor=predictor, **parts)


def _views(batch: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 4, 4, generator=g), torch.randn(batch, 3, 4, 4, generator=g)


def _one_step(model, v1, v2):
    opt = LARS(param_groups(model, weight_decay=1e-4), lr=0.0)
    train_step(model, opt, v1, v2, lr=0.5, tau=0.9)
    train_step(model, opt, v2, v1, lr=0.5, tau=0.9)  # moco: this step's negatives are step 1's keys


def _ddp_step_worker(rank: int, port: int, out: str, kind: str) -> None:
    _env(rank, port)
    distributed.init_from_env("cpu")
    try:
        model = _mlp_byol(kind)
        v1, v2 = _views(8)
        half = slice(rank * 4, rank * 4 + 4)
        _one_step(distributed.wrap(model, torch.device("cpu")), v1[half], v2[half])
        torch.save(model.state_dict(), f"{out}.{rank}")
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("kind", list(KINDS))
def test_ddp_steps_equal_single_process_steps(tmp_path, kind):
    """Global batch 8 over 2 ranks == batch 8 in one process, also for the InfoNCE negatives
    (gathered across ranks, with gradients) and for the MoCo queue (every rank's keys)."""
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_step_worker, args=(_free_port(), out, kind), nprocs=WORLD, join=True)
    ref = _mlp_byol(kind)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    _one_step(ref, *_views(8))
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    moved = 0
    for k, v in ref.state_dict().items():
        for ddp in ranks:  # the queue too: the same keys in the same slots on every rank
            assert torch.allclose(ddp[k], v, atol=1e-5, rtol=0), k
        moved += not torch.equal(v, start[k])
    assert moved > 0  # the steps did something (online and target parameters changed)
    if kind == "moco":
        assert int(ref.queue.count) == 24 and int(ref.queue.ptr) == 32 % 24


def _accumulated_steps(model, v1, v2, n: int):
    opt = LARS(param_groups(model, weight_decay=1e-4), lr=0.0)
    train_step(model, opt, v1, v2, lr=0.5, tau=0.9, accumulate_steps=n)
    train_step(model, opt, v2, v1, lr=0.5, tau=0.9, accumulate_steps=n)


def _ddp_accumulate_worker(rank: int, port: int, out: str, kind: str) -> None:
    _env(rank, port)
    distributed.init_from_env("cpu")
    try:
        model = _mlp_byol(kind)
        v1, v2 = _views(8)
        half = slice(rank * 4, rank * 4 + 4)
        _accumulated_steps(distributed.wrap(model, torch.device("cpu")), v1[half], v2[half], 2)
        torch.save(model.state_dict(), f"{out}.{rank}")
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("kind", ["byol", "moco"])
def test_ddp_with_accumulation_equals_one_process_without(tmp_path, kind):
    """optim.accumulate_steps=2 under DDP: 2 ranks x 2 micro-batches of 2 (all-reduce on the last
    backward only, ``no_sync`` before) == batch 8 in one process with N=1, the queue too."""
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_accumulate_worker, args=(_free_port(), out, kind), nprocs=WORLD, join=True)
    ref = _mlp_byol(kind)
    _accumulated_steps(ref, *_views(8), 1)
    for r in range(WORLD):
        ddp = torch.load(f"{out}.{r}", weights_only=True)
        for k, v in ref.state_dict().items():
            assert torch.allclose(ddp[k], v, atol=1e-5, rtol=0), k


def test_sampler_ranks_split_each_global_batch():
    one = list(ResumableSampler(20, seed=3, batch_size=8))
    ranks = [list(ResumableSampler(20, seed=3, rank=r, world_size=2, batch_size=8)) for r in range(2)]
    # global batch g = rank 0's 4 then rank 1's 4, in the single-process order; the tail is dropped
    merged = [x for g in range(2) for r in range(2) for x in ranks[r][g * 4:(g + 1) * 4]]
    assert merged == one[:16]
    s = ResumableSampler(20, seed=3, rank=1, world_size=2, batch_size=8)
    s.set_epoch(0, start=8)  # resumed after one global step
    assert list(s) == ranks[1][4:]
    with pytest.raises(ValueError, match="multiple"):
        ResumableSampler(20, seed=3, world_size=2, batch_size=7)


def _cfg(tmp_path, name, *extra):
    return load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=64", "data.val_fraction=0.25",
                              "train.checkpoint_every=100", f"train.out_dir={tmp_path}",
                              f"train.name={name}", *extra])


def _pretrain_worker(rank: int, port: int, runs: list) -> None:
    from byol.train.pretrain import pretrain

    _env(rank, port)
    try:
        for cfg, resume in runs:
            pretrain(cfg, resume=resume)
    finally:
        distributed.shutdown()


def test_two_processes_pretrain_a_resnet_rank0_writes_and_resume_is_exact(tmp_path):
    # 48 training images, global batch 8 (4 per rank): 6 steps per epoch, 2 epochs
    full = [(_cfg(tmp_path, "full"), None)]
    mp.spawn(_pretrain_worker, args=(_free_port(), full), nprocs=WORLD, join=True)
    split = [(_cfg(tmp_path, "split", "train.max_steps=5"), None)]
    mp.spawn(_pretrain_worker, args=(_free_port(), split), nprocs=WORLD, join=True)
    resume = [(_cfg(tmp_path, "split"), str(tmp_path / "split"))]
    mp.spawn(_pretrain_worker, args=(_free_port(), resume), nprocs=WORLD, join=True)

    a = load_checkpoint(find_checkpoint(tmp_path / "full"))
    b = load_checkpoint(find_checkpoint(tmp_path / "split"))
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for run in ("full", "split"):  # rank 0 alone logs: each step once, one event file
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
        assert len(list((tmp_path / run / "tb").iterdir())) >= 1
        assert sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) == ["last.pt", "previous.pt"]
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["finished"]
    assert (tmp_path / "full" / "eval" / "knn.json").is_file()


def _budget_worker(rank: int, port: int, cfg, step_s: tuple[float, ...]) -> None:
    """A budgeted run whose ranks' clocks differ: each rank's step "takes" step_s[rank]."""
    import byol.train.loop as loop

    t, step = [1000.0], loop.train_step

    def timed_step(*args, **kwargs):
        t[0] += step_s[rank]
        return step(*args, **kwargs)

    loop.now, loop.train_step = (lambda: t[0]), timed_step
    _pretrain_worker(rank, port, [(cfg, None)])


def test_a_budget_under_two_processes_follows_rank_0s_clock(tmp_path):
    from byol.train.budget import BudgetMeter

    # a 30 s budget: the 10-step window is shorter than 5% of it on both ranks, and each rank's own
    # clock would extend it to other steps (rank 0 to step 18, rank 1 to 25): a hang, unless
    # every rank measures with rank 0's clock
    step_s = (0.1, 0.07)
    cfg = _cfg(tmp_path, "budget", "train.budget=30s", "eval.final_knn=false", "eval.online_linear=false")
    ctx = mp.spawn(_budget_worker, args=(_free_port(), cfg, step_s), nprocs=WORLD, join=False)
    for _ in range(60):  # 5 minutes at most: a hang fails the test instead of the suite
        if ctx.join(timeout=5):
            break
    else:
        for proc in ctx.processes:
            proc.kill()
        pytest.fail("the two ranks did not finish a budgeted run (a collective out of step)")
    meter = BudgetMeter(30.0, start_step=0)
    fixed = next(f for f in (meter.after_step(s, s * step_s[0]) for s in range(1, 400)) if f is not None)
    assert fixed.step > 13  # the window was extended
    summary = json.loads((tmp_path / "budget" / "summary.json").read_text())
    assert summary["finished"] and summary["total_steps"] == summary["step"]
    # rank 0's total (300 at 0.1 s a step; within one step: the fake clock's float sums); rank
    # 1's clock would have planned about 428
    assert abs(summary["total_steps"] - fixed.total) <= 1


def test_torchrun_command_line(tmp_path):
    """The documented launch line: torchrun --nproc-per-node 2 -m byol pretrain ... (gloo, CPU)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "byol", "pretrain", "--config", "demo", *TINY,
           "data.shapes_size=40", "data.val_fraction=0.2", "optim.epochs=1", "train.budget=null",
           "augment.eval_size=null", "train.device=cpu",
           f"train.out_dir={tmp_path}", "train.name=tr"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("run directory:") == 1  # rank 0 alone reports
    rows = [json.loads(x) for x in (tmp_path / "tr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # 32 images / global batch 8
