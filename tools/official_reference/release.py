"""Import DeepMind's released BYOL code for the fixture scripts of this folder (development only).

The release imports two packages it does not need for the values recorded here
(``tensorflow_datasets``, ``acme``) and jax names removed since it was written (``jax.tree_map``,
``jax.host_id``): they are stubbed or put back before it is imported. Nothing of the release is
copied; the scripts call its functions and store what they return. Setup: README.md here.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path


def import_release(path: str) -> types.SimpleNamespace:
    """The release's modules from ``path`` (the directory holding its ``byol`` package): ``aug``
    (utils/augmentations), ``dataset`` (also ``data``), ``networks``, ``optimizers``,
    ``schedules``, ``helpers``, ``experiment`` (byol_experiment) and ``config`` (configs/byol)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.tree_map = jax.tree_util.tree_map
    jax.host_id = jax.process_index
    tfds = types.ModuleType("tensorflow_datasets")
    tfds.Split = object
    acme, acme_jax, acme_utils = (types.ModuleType(n) for n in ("acme", "acme.jax", "acme.jax.utils"))
    acme.jax, acme_jax.utils = acme_jax, acme_utils
    sys.modules.update({"tensorflow_datasets": tfds, "acme": acme, "acme.jax": acme_jax,
                        "acme.jax.utils": acme_utils})
    sys.path.insert(0, str(Path(path).resolve()))
    from byol import byol_experiment
    from byol.configs import byol as config
    from byol.utils import augmentations, dataset, helpers, networks, optimizers, schedules

    return types.SimpleNamespace(aug=augmentations, dataset=dataset, data=dataset, networks=networks,
                                 optimizers=optimizers, schedules=schedules, helpers=helpers,
                                 experiment=byol_experiment, config=config)
