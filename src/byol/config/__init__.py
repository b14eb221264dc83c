"""Typed, frozen run configuration (sections.py) and its YAML files and overrides (loading.py).

A config has seven sections (Data, Augment, Model, Method, Optim, Train, Eval); every field has a
default, a YAML file sets some of them, and command-line overrides such as ``optim.epochs=1`` win
over both. Every failure is a ``ConfigError`` whose one-line message names the key and the value.
"""
from byol.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
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
    "Train", "apply_overrides", "config_from_dict", "config_to_dict", "load_config", "read_yaml",
    "replace", "save_config",
]
