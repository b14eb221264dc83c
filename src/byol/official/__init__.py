"""DeepMind's released BYOL checkpoints (``pretrain_res50x1.pkl``, ``pretrain_res200x2.pkl``) as our
encoders (docs/fidelity.md).

- ``unpickle``: a restricted unpickler for the release's dill pickles (arrays and records only;
  anything else is refused, naming it, without running it);
- ``convert``: the release's haiku ResNet names and layouts -> our ResNet's state dict;
- ``checkpoint``: read a checkpoint and build the encoder (``padding="same"``).

Writing one in our export format is ``byol.export.import_official`` (``byol import-official``);
``byol.load_encoder`` reads a ``.pkl`` directly.

    byol import-official pretrain_res50x1.pkl --out res50x1.safetensors
"""
from __future__ import annotations

from byol.official.checkpoint import official_encoder, read_official
from byol.official.unpickle import RefusedPickle, load_pickle

__all__ = ["RefusedPickle", "load_pickle", "official_encoder", "read_official"]
