"""Which YAML file a ``--config`` argument names: a path, or a config shipped with the package."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from byol.config.sections import ConfigError


def builtin_configs() -> list[str]:
    """The names of the configs shipped in ``byol/configs`` (``demo``, ``cifar10_resnet18``, ...)."""
    return sorted(p.name[:-5] for p in resources.files("byol").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a built-in config (``demo``, ``cifar10_resnet18``, ...)."""
    path = Path(name)
    if path.exists():
        return path  # a folder is reported by read_yaml
    # `configs/x.yaml` or `x`: the shipped copy also works outside the source tree
    builtin = resources.files("byol").joinpath("configs", f"{path.stem}.yaml")
    if path.suffix in ("", ".yaml") and path.parent.name in ("", "configs") and builtin.is_file():
        return Path(str(builtin))
    raise ConfigError(f"config: file not found: {name} (built-in configs: {', '.join(builtin_configs())})")
