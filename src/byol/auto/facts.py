"""The facts the ``auto`` rules read: how many images a run trains on and how large they are, and
where it trains.

Image sizes come from the headers of a seeded sample of up to ``SAMPLE`` files of a folder
(nothing is decoded), or from decoding a sample of tar shards or of the built-in shapes.
"""
from __future__ import annotations

import os
import random
import statistics

import torch

from byol.auto.rules import DataFacts, DeviceFacts
from byol.data.errors import DataError
from byol.data.headers import read_header

SAMPLE = 200  # images whose size is read
DECODE_SAMPLE = 32  # when sizes need a decode (shards, the shapes)


def _short_sides(images, seed: int) -> list[int]:
    files = getattr(images, "files", None)
    rng = random.Random(seed)
    if files is not None:
        sides = []
        for i in sorted(rng.sample(range(len(files)), min(SAMPLE, len(files)))):
            try:
                h = read_header(files[i])
            except DataError:  # the loader skips or fails on it; the sample just has one fewer
                continue
            sides.append(min(h.width, h.height))
        return sides
    n = len(images)
    picks = sorted(rng.sample(range(n), min(DECODE_SAMPLE, n)))
    return [min(images[i][0].shape[-2:]) for i in picks]


def data_facts(images, n_train: int, seed: int = 0) -> DataFacts:
    """``images``: the run's raw dataset (``open_images``); ``n_train``: its training images."""
    sides = _short_sides(images, seed) or [0]
    return DataFacts(images=n_train, short_side=int(statistics.median(sides)), sampled=len(sides))


def device_facts(device: torch.device, processes: int = 1) -> DeviceFacts:
    if device.type == "cuda":
        return DeviceFacts("cuda", torch.cuda.get_device_name(device), processes)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return DeviceFacts("cpu", f"{cores} CPU cores", processes)
