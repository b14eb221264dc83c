"""Weighted kNN (docs/method.md §5) against hand-computed votes."""
import math

import pytest
import torch

from byol.eval.knn import accuracy, knn_predict


def test_weighted_votes_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(bank, labels, q, num_classes=2, k=2, temperature=0.5)
    # neighbours: bank[0] (s=1, class 0), bank[1] (s=0.8, class 1); bank[2] is the 3rd
    torch.testing.assert_close(scores, torch.tensor([[math.exp(2.0), math.exp(1.6)]]))


def test_temperature_changes_the_winner():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.436], [0.9, -0.436]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    sharp = knn_predict(bank, labels, q, num_classes=2, k=3, temperature=0.01)
    flat = knn_predict(bank, labels, q, num_classes=2, k=3, temperature=10.0)
    assert sharp.argmax().item() == 0 and flat.argmax().item() == 1


def test_clustered_data_is_classified_and_features_are_normalised():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 5
    labels = torch.arange(4).repeat_interleave(50)
    bank = centres[labels] + torch.randn(200, 16)
    test = (centres[labels] + torch.randn(200, 16)) * 7  # scale must not matter (cosine)
    scores = knn_predict(bank, labels, test, num_classes=4, k=20, temperature=0.1, chunk=33)
    assert accuracy(scores, labels) > 95.0
    assert accuracy(scores, labels, topk=3) > 99.0
    assert accuracy(scores, labels, topk=4) is None  # 4 classes: every label is in the top 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="k >= 1"):
        knn_predict(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), torch.ones(1, 2), num_classes=1, k=0)


def test_top5_is_reported_only_with_more_than_five_classes():
    from byol.cli.evaluate import top5_text
    from byol.eval.knn import accuracy

    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    six = torch.eye(6)[[1, 2, 3, 4, 5, 0]] + torch.eye(6) * 0.5  # the right class comes second
    assert accuracy(six, labels, 1) == 0.0 and accuracy(six, labels, 5) == 100.0
    five = torch.eye(5)
    assert accuracy(five, labels[:5], 1) == 100.0 and accuracy(five, labels[:5], 5) is None
    assert top5_text({"top5": None}) == "" and top5_text({"top5": 91.5}) == ", top-5 91.50%"
