"""Model families, each composed from ``vlp.nn`` blocks, built from their config by family.

Importing this package registers every family with `vlp.models.registry`."""

from __future__ import annotations

from vlp.models.blip import BLIP, build_blip
from vlp.models.blip2 import BLIP2, build_blip2
from vlp.models.clip import CLIP, build_clip
from vlp.models.coca import CoCa, build_coca
from vlp.models.lm import CausalLM, build_lm
from vlp.models.registry import MODEL_BUILDERS, build_model, load_model_dir
from vlp.models.simvlm import SimVLM, build_simvlm

__all__ = ["BLIP", "BLIP2", "CLIP", "MODEL_BUILDERS", "CausalLM", "CoCa", "SimVLM", "build_blip",
           "build_blip2", "build_clip", "build_coca", "build_lm", "build_model", "build_simvlm",
           "load_model_dir"]
