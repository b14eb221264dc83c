"""Weighted kNN classifier on frozen features (docs/method.md §5, kNN monitor).

Each test sample votes with its k nearest training samples by cosine similarity s, weighted by
exp(s / T) (k = 200, T = 0.1 by default, as in the common monitors of public reproductions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [Q, C] for queries [Q, D] against a bank [N, D] with labels [N].

    Features are L2-normalised here, so callers may pass raw representations.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn: need k >= 1 and temperature > 0, got k={k}, T={temperature}")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=q.device)
        scores.scatter_add_(1, bank_labels[idx], weights)
        out.append(scores)
    return torch.cat(out)


def accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: int = 1) -> float | None:
    """Top-k accuracy in percent; None for k > 1 unless there are more than k classes (with k
    classes or fewer every label is among the top k: 100% that says nothing)."""
    if topk > 1 and scores.shape[1] <= topk:
        return None
    hit = (scores.topk(topk, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hit.float().mean().item()


def evaluate_knn(
    encoder: torch.nn.Module,
    bank,
    test,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: bool = False,
) -> dict:
    """Extract frozen features of ``bank`` and ``test`` datasets and score weighted kNN.

    Returns {"top1", "top5", "k", "temperature", "n_bank", "n_test"} (accuracies in percent).
    """
    from byol.eval.features import extract_features

    kw = dict(batch_size=batch_size, device=device, workers=workers, progress=progress)
    fb, lb = extract_features(encoder, bank, desc="kNN bank", **kw)
    ft, lt = extract_features(encoder, test, desc="kNN test", **kw)
    scores = knn_predict(fb, lb, ft, num_classes=num_classes, k=k, temperature=temperature)
    return {
        "top1": accuracy(scores, lt, 1),
        "top5": accuracy(scores, lt, 5),
        "k": k,
        "temperature": temperature,
        "n_bank": len(lb),
        "n_test": len(lt),
    }
