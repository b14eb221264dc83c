"""The released BYOL checkpoints' haiku ResNet -> our ResNet's state dict (docs/fidelity.md).

The release's encoder is haiku's ResNet v1 (byol/utils/networks.py): modules named
``<torso>/~/initial_conv``, ``<torso>/~/initial_batchnorm`` and, for group K (0-3) and block J,
``<torso>/~/block_group_K/~/block_J/~/conv_I`` / ``batchnorm_I`` (I = 0, 1, 2: the 1x1, the strided
3x3 and the 1x1 of a bottleneck) and ``shortcut_conv`` / ``shortcut_batchnorm`` (first block of each
group), where ``<torso>`` is the class's module name, e.g. ``res_net50`` or ``res_net200``. They map
one to one onto torchvision's Bottleneck ResNet (``conv1``/``bn1``, ``layerK+1.J.convI+1`` /
``bnI+1``, ``downsample.0`` / ``downsample.1``): the same layers, the stride on the 3x3 in both.

    haiku                                torch
    conv  ``w``  [kh, kw, in, out]        ``weight`` [out, in, kh, kw]
    BN    ``scale`` / ``offset``          ``weight`` / ``bias`` [C]   (haiku: [1, 1, 1, C] or [C])
    BN    state ``~/mean_ema`` / ``~/var_ema``: ``average`` (the debiased moving average; not
          ``hidden``, its biased accumulator)  ->  ``running_mean`` / ``running_var`` [C];
          ``counter`` -> ``num_batches_tracked``

Only the numerics of padding differ: haiku pads "SAME", so the converted encoder is built with
``padding="same"`` (docs/fidelity.md). The depth (50/101/152/200) is read from the number of
blocks per group and the width multiplier from the stem's channels (64 x width).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from byol.data.errors import DataError
from byol.models.backbones import RESNET_SPECS, resnet

_BLOCK = re.compile(r"block_group_(\d+)/~/block_(\d+)/~/(conv_\d|batchnorm_\d|shortcut_conv|shortcut_batchnorm)")
# haiku module (inside a block) -> torchvision Bottleneck attribute
_BLOCK_LAYERS = {"conv_0": "conv1", "conv_1": "conv2", "conv_2": "conv3", "batchnorm_0": "bn1",
                 "batchnorm_1": "bn2", "batchnorm_2": "bn3", "shortcut_conv": "downsample.0",
                 "shortcut_batchnorm": "downsample.1"}
# blocks per group -> our backbone name (the Bottleneck ResNets)
_DEPTHS = {layers: name for name, (block, layers) in RESNET_SPECS.items() if block.expansion == 4}


@dataclass(frozen=True)
class Source:
    """Where one torch tensor comes from: ``tree`` ("params" or "state"), haiku ``module`` and
    ``leaf``; ``kind`` says how it is reshaped: "conv" (HWIO -> OIHW), "vector" ([..., C] -> [C])
    or "count" (scalar -> int64)."""

    tree: str
    module: str
    leaf: str
    kind: str


def torso_prefix(params: Mapping[str, Any]) -> str:
    """The encoder's haiku module name (``res_net50``, ``res_net200``, ...): the one module path
    that has an ``initial_conv``."""
    found = sorted({m[: -len("/~/initial_conv")] for m in params if m.endswith("/~/initial_conv")})
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(found)})"
        raise DataError(f"expected one haiku ResNet (a module '<name>/~/initial_conv'), found {what}")
    return found[0]


def _torch_layer(rest: str) -> tuple[str, bool] | None:
    """haiku module path inside the torso -> (torch module path, is a BN layer); None if unknown."""
    if rest == "initial_conv":
        return "conv1", False
    if rest == "initial_batchnorm":
        return "bn1", True
    m = _BLOCK.fullmatch(rest)
    if m is None:
        return None
    group, block, layer = int(m[1]), int(m[2]), m[3]
    return f"layer{group + 1}.{block}.{_BLOCK_LAYERS[layer]}", "batchnorm" in layer


def plan(params: Mapping[str, Mapping[str, Any]], state: Mapping[str, Mapping[str, Any]]) -> dict[str, Source]:
    """torch state-dict key -> :class:`Source`, for the ResNet of haiku ``params`` / ``state``
    ({module: {leaf: array}}; only the names matter). Refuses a module of the torso it cannot map
    (a ResNet v2, a non-bottleneck block) rather than dropping it."""
    prefix = torso_prefix(params)
    out: dict[str, Source] = {}
    for module in sorted(params):
        if not module.startswith(prefix + "/~/"):
            continue  # projector, predictor, classifier: not the encoder
        rest = module[len(prefix) + 3:]
        layer = _torch_layer(rest)
        if layer is None:
            raise DataError(f"haiku module {module!r} has no counterpart in our ResNet v1 "
                            "(only the release's bottleneck ResNet v1 encoders convert)")
        path, is_bn = layer
        if is_bn:
            if set(params[module]) != {"scale", "offset"}:
                raise DataError(f"{module}: expected BN 'scale' and 'offset', found {sorted(params[module])}")
            out[f"{path}.weight"] = Source("params", module, "scale", "vector")
            out[f"{path}.bias"] = Source("params", module, "offset", "vector")
            for ema, buffer in (("mean_ema", "running_mean"), ("var_ema", "running_var")):
                name = f"{module}/~/{ema}"
                if name not in state or "average" not in state[name]:
                    raise DataError(f"no moving average {name}/average in the network state")
                out[f"{path}.{buffer}"] = Source("state", name, "average", "vector")
            if "counter" in state[f"{module}/~/mean_ema"]:
                out[f"{path}.num_batches_tracked"] = Source("state", f"{module}/~/mean_ema", "counter", "count")
        else:
            if set(params[module]) != {"w"}:
                raise DataError(f"{module}: expected one conv weight 'w' (no bias), found {sorted(params[module])}")
            out[f"{path}.weight"] = Source("params", module, "w", "conv")
    return out


def architecture(params: Mapping[str, Mapping[str, Any]]) -> tuple[str, float]:
    """(our backbone name, width) of the haiku ResNet in ``params``: the depth from the blocks
    per group, the width from the stem's output channels (64 x width)."""
    prefix = torso_prefix(params)
    blocks: dict[int, set[int]] = {}
    for module in params:
        m = _BLOCK.fullmatch(module[len(prefix) + 3:]) if module.startswith(prefix + "/~/") else None
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    if sorted(blocks) != [0, 1, 2, 3] or any(b != set(range(len(b))) for b in blocks.values()):
        raise DataError(f"{prefix}: expected 4 block groups of consecutive blocks, found {sorted(blocks)}")
    layers = tuple(len(blocks[g]) for g in range(4))
    if not any(f"{prefix}/~/block_group_0/~/block_0/~/conv_2" == m for m in params):
        raise DataError(f"{prefix}: a ResNet without bottleneck blocks ({layers} blocks per group); only "
                        f"the bottleneck ResNets convert ({', '.join(_DEPTHS.values())})")
    if layers not in _DEPTHS:
        raise DataError(f"{prefix}: {layers} blocks per group is none of "
                        + ", ".join(f"{n} {spec}" for spec, n in _DEPTHS.items()))
    stem = tuple(np.shape(params[f"{prefix}/~/initial_conv"]["w"]))
    if len(stem) != 4 or stem[2] != 3:
        raise DataError(f"{prefix}/~/initial_conv/w has shape {stem}, expected [7, 7, 3, 64 x width]")
    return _DEPTHS[layers], stem[3] / 64


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a haiku leaf of ``shape`` under ``kind`` (see :class:`Source`)."""
    if kind == "conv":
        if len(shape) != 4:
            raise DataError(f"a conv weight has 4 dims [kh, kw, in, out], got {list(shape)}")
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if kind == "vector":
        if not shape or any(d != 1 for d in shape[:-1]):
            raise DataError(f"a BN vector has shape [C] or [1, 1, 1, C], got {list(shape)}")
        return (shape[-1],)
    if kind == "count":
        return ()
    raise ValueError(kind)


def _tensor(kind: str, value: Any, where: str) -> torch.Tensor:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise DataError(f"{where}: expected numbers, got dtype {array.dtype}")
    shape = torch_shape(kind, array.shape)
    if kind == "conv":
        return torch.from_numpy(np.ascontiguousarray(array.transpose(3, 2, 0, 1), dtype=np.float32))
    if kind == "vector":
        return torch.from_numpy(np.ascontiguousarray(array.reshape(shape), dtype=np.float32))
    return torch.tensor(int(array), dtype=torch.int64)


def encoder_state_dict(params: Mapping[str, Mapping[str, Any]], state: Mapping[str, Mapping[str, Any]]
                       ) -> tuple[str, float, dict[str, torch.Tensor]]:
    """(backbone, width, state dict) of our ResNet for the haiku encoder in ``params``/``state``
    (float32; checked key by key and shape by shape against ``resnet(backbone, width)``)."""
    backbone, width = architecture(params)
    sources = plan(params, state)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in resnet(backbone, width=width).state_dict().items()}
    check_plan(sources, expected, backbone, width, params, state)
    trees = {"params": params, "state": state}
    tensors = {}
    for key, src in sources.items():
        tensors[key] = _tensor(src.kind, trees[src.tree][src.module][src.leaf], f"{src.module}/{src.leaf}")
    return backbone, width, tensors


def check_plan(sources: Mapping[str, Source], expected: Mapping[str, tuple[int, ...]], backbone: str,
               width: float, params: Mapping, state: Mapping) -> None:
    """Every key of our model comes from exactly one haiku leaf of the right shape."""
    trees = {"params": params, "state": state}
    missing = sorted(set(expected) - set(sources))
    extra = sorted(set(sources) - set(expected))
    if missing or extra:
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {extra[:3]}" if extra else "")
        raise DataError(f"the haiku ResNet does not match our {backbone} width={width:g}: {detail.strip()}")
    for key, src in sources.items():
        shape = torch_shape(src.kind, tuple(np.shape(trees[src.tree][src.module][src.leaf])))
        if shape != expected[key]:
            raise DataError(f"{src.module}/{src.leaf} -> {key}: shape {list(shape)}, our {backbone} "
                            f"width={width:g} has {list(expected[key])}")
