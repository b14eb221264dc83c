"""seeded(): the CPU generator forked (and seeded), the caller's stream untouched."""
from __future__ import annotations

import pytest
import torch

from byol.seeding import sample_seed, seeded


def test_seeded_draws_from_the_seed_and_restores_the_callers_stream():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with seeded(11):
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(inside, torch.rand(4, generator=torch.Generator().manual_seed(11)))
    with pytest.raises(RuntimeError), seeded(11):
        torch.rand(4)
        raise RuntimeError("the state comes back on an exception too")
    assert torch.equal(torch.get_rng_state(), before)


def test_seeded_without_a_seed_forks_only():
    torch.manual_seed(3)
    with seeded():
        inside = torch.rand(4)
    assert torch.equal(inside, torch.rand(4))  # the caller then draws what the block drew


def test_sample_seed_is_a_fixed_mix():
    assert sample_seed(0, 0, 5) == 5
    assert sample_seed(1, 2, 3) == (0x9E3779B97F4A7C15 + 2 * 0xC2B2AE3D27D4EB4F + 3) % 2**63
    assert len({sample_seed(0, e, i) for e in range(4) for i in range(4)}) == 16
