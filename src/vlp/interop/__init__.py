"""Weights in and out of reference libraries (HF transformers, open_clip, original BLIP /
LAVIS), as strict key maps.

Nothing here imports transformers or open_clip: both formats are plain JSON + safetensors (or a
weights-only torch file), so the core package works without the ``interop`` extra. One
exception: an open_clip SigLIP config names its image tower by a timm architecture, so reading
or writing one asks timm (installed with open_clip) what that name builds, on the meta device.
"""

from vlp.interop.convert import FORMATS, convert, load_any, load_vlp
from vlp.interop.hf import load_hf, save_hf
from vlp.interop.hf_blip import load_hf_blip, save_hf_blip
from vlp.interop.keymap import KeyMap
from vlp.interop.lavis_blip import load_lavis_blip, save_lavis_blip
from vlp.interop.open_clip import load_open_clip, save_open_clip
from vlp.interop.skeleton import ImportedModel

__all__ = [
    "FORMATS", "ImportedModel", "KeyMap", "convert", "load_any", "load_hf", "load_hf_blip",
    "load_lavis_blip", "load_open_clip", "load_vlp", "save_hf", "save_hf_blip", "save_lavis_blip",
    "save_open_clip",
]
