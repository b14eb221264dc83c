"""Which YAML file a ``--config`` argument names: a path, or a config shipped with the package.

The rule (also in ``byol pretrain --help``): a bare name -- no slash, no suffix, e.g. ``auto`` --
is a built-in config, whatever the working directory holds, so a folder or file named ``auto``
beside the user cannot shadow it. Anything written as a path (``./auto.yaml``, ``my.yaml``,
``configs/x.yaml``) is that file; ``configs/NAME.yaml`` and ``NAME.yaml`` that do not exist fall
back to the shipped copy of that name, so the README's commands also work outside the source tree.
A bare name that is not built-in is read as a file when one of that name exists.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from byol.config.sections import ConfigError


def builtin_configs() -> list[str]:
    """The names of the configs shipped in ``byol/configs`` (``demo``, ``cifar10_resnet18``, ...)."""
    return sorted(p.name[:-5] for p in resources.files("byol").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml"))


def _builtin(name: str) -> Path | None:
    shipped = resources.files("byol").joinpath("configs", f"{name}.yaml")
    return Path(str(shipped)) if shipped.is_file() else None


def is_bare_name(name: str) -> bool:
    """Whether ``--config`` was given as a name (no slash, no suffix), not as a path."""
    return "/" not in name and "\\" not in name and Path(name).suffix == "" and name not in (".", "..")


def resolve_config_path(name: str) -> Path:
    """A built-in config for a bare name (``demo``, ``auto``, ...), else the YAML file ``name``."""
    path = Path(name)
    if is_bare_name(name):
        shipped = _builtin(name)
        if shipped is not None:
            return shipped
    if path.exists():
        return path  # a folder is reported by read_yaml
    shipped = _builtin(path.stem)
    if path.suffix == ".yaml" and path.parent.name in ("", "configs") and shipped is not None:
        return shipped
    raise ConfigError(f"config: file not found: {name} (built-in configs: {', '.join(builtin_configs())})")
