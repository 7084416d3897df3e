"""Data modalities: how each kind of data becomes model inputs and explanation units.

One module per modality, registered in ``MODALITIES`` (name -> "module:Class"); a new modality
is one new file plus one line here. The interface is ``governance.modality.base.Modality``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from governance.modality.base import QUALITY_KINDS, detect_modality

if TYPE_CHECKING:
    from governance.modality.base import Modality

MODALITIES: dict[str, str] = {
    "tabular": "governance.modality.tabular:TabularModality",
    "image": "governance.modality.image:ImageModality",
    "text": "governance.modality.text:TextModality",
}


def modality_class(name: str) -> type["Modality"]:
    """The class registered under ``name``."""
    if name not in MODALITIES:
        raise KeyError(f"unknown modality '{name}'; known: {', '.join(sorted(MODALITIES))}")
    module, cls = MODALITIES[name].split(":")
    return getattr(import_module(module), cls)


def get_modality(cfg: Any) -> "Modality":
    """The modality the configuration names (``cfg.modality``), set up with that configuration."""
    return modality_class(cfg.modality)(cfg)


__all__ = ["MODALITIES", "QUALITY_KINDS", "detect_modality", "get_modality", "modality_class"]
