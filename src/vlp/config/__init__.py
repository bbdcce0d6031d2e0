"""Model configs as dataclasses, named presets, and their JSON round trip
(`vlp.config.schema`, `vlp.config.presets`).

A config is pure data: it is saved as ``config.json`` beside every checkpoint, so a
checkpoint directory is enough to rebuild its model.
"""

from vlp.config.presets import PRESETS, get_preset, list_presets, register_preset
from vlp.config.schema import (
    CONFIG_CLASSES,
    OPENAI_MEAN,
    OPENAI_STD,
    VQA_PROMPT,
    Blip2Config,
    BlipConfig,
    ClipConfig,
    CocaConfig,
    LMConfig,
    ModelConfig,
    SimvlmConfig,
    TextConfig,
    VisionConfig,
    check_fields,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

__all__ = [
    "Blip2Config",
    "BlipConfig",
    "CONFIG_CLASSES",
    "ClipConfig",
    "CocaConfig",
    "LMConfig",
    "ModelConfig",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "PRESETS",
    "SimvlmConfig",
    "TextConfig",
    "VQA_PROMPT",
    "VisionConfig",
    "check_fields",
    "config_from_dict",
    "config_to_dict",
    "get_preset",
    "list_presets",
    "load_config",
    "register_preset",
    "save_config",
]
