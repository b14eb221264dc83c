"""Typed, frozen run configuration (sections.py), its YAML files and overrides (loading.py) and
which file a ``--config`` names (files.py). The config of a resumed run: ``byol.config.resume``.

A config has seven sections (Data, Augment, Model, Method, Optim, Train, Eval); every field has a
default, a YAML file sets some of them, and command-line overrides such as ``optim.epochs=1`` win
over both. Every failure is a ``ConfigError`` whose one-line message names the key and the value.
"""
from byol.config.files import builtin_configs, resolve_config_path
from byol.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    parse_overrides,
    read_yaml,
    replace,
    save_config,
)
from byol.config.sections import (
    SECTIONS,
    Augment,
    Config,
    ConfigError,
    Data,
    Eval,
    Method,
    Model,
    Optim,
    Train,
)

__all__ = [
    "SECTIONS", "Augment", "Config", "ConfigError", "Data", "Eval", "Method", "Model", "Optim",
    "Train", "apply_overrides", "builtin_configs", "config_from_dict", "config_to_dict",
    "load_config", "parse_override", "parse_overrides", "read_yaml", "replace",
    "resolve_config_path", "save_config",
]
