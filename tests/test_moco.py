"""MoCo's queue of negatives: FIFO, target projections only, no gradient, InfoNCE against it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from byol import LARS, param_groups
from byol.config import load_config
from byol.config.sections import ConfigError
from byol.losses import InfoNCELoss, symmetric_infonce_loss
from byol.models.queue import NegativeQueue
from byol.train.step import train_step
from conftest import tiny_byol


def test_queue_is_fifo_and_overwrites_the_oldest():
    q = NegativeQueue(5, 3)
    first, second = torch.randn(3, 3), torch.randn(4, 3)
    q.push(first)
    assert int(q.count) == 3 and int(q.ptr) == 3
    assert q.valid().tolist() == [True, True, True, False, False]
    assert torch.allclose(q.keys[:3], F.normalize(first, dim=-1))
    q.push(second)  # slots 3, 4, then 0, 1: the two oldest keys of `first` are gone
    expected = F.normalize(torch.cat((second[2:], first[2:], second[:2])), dim=-1)
    assert torch.allclose(q.keys, expected)
    assert int(q.count) == 5 and int(q.ptr) == 2 and q.valid().all()
    last = torch.randn(12, 3)
    q.push(last[:4], last[4:])  # more keys than slots: the newest 5 remain, in order
    assert int(q.count) == 5 and int(q.ptr) == (2 + 5) % 5
    assert torch.allclose(q.keys, F.normalize(last[-5:], dim=-1).roll(2, dims=0))
    # keys that carry a graph are stored detached: the queue never holds a gradient path
    q.push(torch.randn(2, 3, requires_grad=True) * 2)
    assert q.keys.grad_fn is None and not q.keys.requires_grad


def test_queue_holds_the_target_projections_of_the_step_without_gradient():
    model = tiny_byol(predictor=False, loss=InfoNCELoss(alpha=0.2, beta=1.0), queue=NegativeQueue(16, 8))
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    with torch.no_grad():  # the target's keys before the step (the EMA moves it after)
        keys = torch.cat([model.target_projector(model.target_encoder(v)) for v in (v1, v2)])
        online = torch.cat([model.projector(model.encoder(v)) for v in (v1, v2)])
    assert int(model.queue.count) == 0
    opt = LARS(param_groups(model, weight_decay=0.0), lr=0.0)
    train_step(model, opt, v1, v2, lr=0.1, tau=0.99)
    assert int(model.queue.count) == 8
    assert torch.allclose(model.queue.keys[:8], F.normalize(keys, dim=-1), atol=1e-6)
    assert not torch.allclose(model.queue.keys[:8], F.normalize(online, dim=-1), atol=1e-3)
    assert "queue.keys" in model.state_dict() and "queue.keys" not in dict(model.named_parameters())
    # the loss reads the queue: the same batch gives another loss with the queue emptied
    with torch.no_grad():
        filled = model(v1, v2).loss
        model.queue.count.zero_()
        empty = model(v1, v2).loss
    assert torch.allclose(empty, torch.tensor(4.0))  # no negatives: 2 per direction exactly
    assert not torch.allclose(filled, empty)


def test_loss_against_the_queue_is_moco_infonce_by_hand():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 8) for _ in range(4))
    queue = torch.randn(7, 8)
    valid = torch.tensor([True] * 6 + [False])  # the last slot is empty: it must not count
    alpha = 0.2
    got = symmetric_infonce_loss(p1, p2, z1, z2, alpha=alpha, beta=1.0, queue=queue, queue_valid=valid)

    def moco(q, k):  # cross-entropy with the positive at index 0 of [pos, filled queue]
        q, k, n = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(queue[:6], dim=-1)
        logits = torch.cat(((q * k).sum(1, keepdim=True), q @ n.T), dim=1) / alpha
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    expected = 4 + 2 * alpha * (moco(p1, z2) + moco(p2, z1))  # 2 + 2 alpha CE per direction
    assert torch.allclose(got, expected, atol=1e-5)


def test_queue_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method.queue_size must be >= 0"):
        load_config(None, ["method.queue_size=-1"])
    with pytest.raises(ConfigError, match="method.queue_size must be 0 unless method.loss=infonce"):
        load_config(None, ["method.queue_size=128"])  # BYOL's regression loss has no negatives
