"""vlp: vision-language pretraining — CLIP, CoCa, BLIP, BLIP-2 and SimVLM in one library."""

from __future__ import annotations

from vlp.config import get_preset, list_presets
from vlp.errors import VlpError

__version__ = "0.1.0"


def list_models() -> list[str]:
    """Every registered preset name."""
    return list_presets()


def create_model(name: str, **overrides):
    """A random-init model from a named preset."""
    from vlp.models import build_model

    config = get_preset(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    return build_model(config)


__all__ = ["VlpError", "create_model", "list_models"]
