"""vlp ``lm`` <-> transformers ``GPT2LMHeadModel`` directories.

GPT-2 keeps its linear layers as ``Conv1D`` (weights stored ``(in, out)``, the transpose of a
``Linear``'s), q|k|v in one ``c_attn`` (as vlp's ``qkv``) and its LM head tied to the token
embeddings (``save_pretrained`` leaves ``lm_head.weight`` out). Exports declare the activation
as ``gelu_pytorch_tanh`` (vlp's exact function); imports also read GPT-2's own ``gelu_new``,
the same function written out (equal to float rounding).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from vlp.config import LMConfig, TextConfig
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.hf_common import (
    ACT_FROM_HF,
    ACT_TO_HF,
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_hf_directory,
    read_hf_weights,
)
from vlp.interop.keymap import KeyMap, Pairs, Tie, export_from, linear_pairs
from vlp.interop.skeleton import (
    ImportedModel,
    attach_tokenizer,
    family_model,
    hf_readable,
    import_model,
    mlp_ratio,
    write_directory,
)
from vlp.models.lm import CausalLM
from vlp.tokenizers import Tokenizer

GPT2_ACT_FROM_HF = {**ACT_FROM_HF, "gelu_new": "gelu_tanh"}
_BLOCK_LAYERS = (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def gpt2_key_map(config: LMConfig) -> KeyMap:
    """vlp ``lm`` <-> HF ``GPT2LMHeadModel`` state-dict names for ``config``."""
    pairs: Pairs = [("text.token_embed.weight", "transformer.wte.weight"),
                    ("text.pos_embed", "transformer.wpe.weight"),
                    *linear_pairs("text.norm", "transformer.ln_f")]
    transposed, buffers = set(), set()
    for i in range(config.text.layers):
        ours, theirs = f"text.transformer.blocks.{i}.", f"transformer.h.{i}."
        pairs += linear_pairs(ours + "norm1", theirs + "ln_1")
        pairs += linear_pairs(ours + "norm2", theirs + "ln_2")
        for a, b in _BLOCK_LAYERS:
            pairs += linear_pairs(ours + a, theirs + b)
            transposed.add(f"{theirs}{b}.weight")
        buffers |= {f"{theirs}attn.bias", f"{theirs}attn.masked_bias"}  # older files' masks
    return KeyMap(pairs=tuple(pairs), transposed=frozenset(transposed),
                  ignored=frozenset(buffers),
                  tied=(Tie("lm_head.weight", "transformer.wte.weight",
                            "the LM head must equal the token embeddings (GPT-2 ties them)"),),
                  write_tied=False)


def lm_config_from_hf(hf: dict[str, Any], where: str = CONFIG_FILE) -> LMConfig:
    """An `LMConfig` from a GPT-2 ``config.json``; options vlp's blocks do not have are refused
    by name."""
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r}, expected 'gpt2'")
    refused = {"scale_attn_by_inverse_layer_idx": True, "add_cross_attention": True,
               "scale_attn_weights": False, "tie_word_embeddings": False}
    found = [f"{key}={value}" for key, value in refused.items() if hf.get(key) == value]
    if found:
        raise CheckpointError(f"{where}: {', '.join(found)} is not supported by vlp's lm")
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACT_FROM_HF:
        raise CheckpointError(f"{where}: activation_function {act!r} not supported; expected "
                              f"one of {sorted(GPT2_ACT_FROM_HF)}")
    width = int(hf.get("n_embd", 768))
    inner = hf.get("n_inner") or 4 * width
    eos = int(hf.get("eos_token_id", 50256))
    pad = hf.get("pad_token_id")
    text = TextConfig(vocab_size=int(hf.get("vocab_size", 50257)),
                      context_length=int(hf.get("n_positions", 1024)), width=width,
                      layers=int(hf.get("n_layer", 12)), heads=int(hf.get("n_head", 12)),
                      mlp_ratio=mlp_ratio(width, int(inner), where),
                      act=GPT2_ACT_FROM_HF[act],
                      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), causal=True,
                      dropout=float(hf.get("resid_pdrop", 0.1)),
                      pad_id=eos if pad is None else int(pad),
                      bos_id=int(hf.get("bos_token_id", 50256)), eos_id=eos)
    return LMConfig(text=text)


def hf_config_from_lm(config: LMConfig) -> dict[str, Any]:
    text = config.text
    if text.act not in ACT_TO_HF:
        raise ConfigError(f"lm act={text.act!r} has no transformers GPT-2 equivalent")
    if text.drop_path:
        raise ConfigError("lm text.drop_path has no transformers GPT-2 equivalent; set it to 0")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": text.vocab_size, "n_positions": text.context_length,
        "n_embd": text.width, "n_layer": text.layers, "n_head": text.heads,
        "n_inner": int(text.width * text.mlp_ratio),
        "activation_function": ACT_TO_HF[text.act], "layer_norm_epsilon": text.norm_eps,
        # vlp's dropout is on the residual branches only
        "resid_pdrop": text.dropout, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": text.bos_id, "eos_token_id": text.eos_id, "pad_token_id": text.pad_id,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "use_cache": True,
    }


def load_hf_gpt2(path: str | os.PathLike[str]) -> ImportedModel:
    """A vlp ``lm`` from an HF ``GPT2LMHeadModel`` directory, with its tokenizer (None when the
    directory has none)."""
    hf = read_hf_directory(path)
    config = lm_config_from_hf(hf.config, hf.where)
    tokenizer = attach_tokenizer(hf.path, config.text.context_length, config.text.vocab_size)
    state, source = read_hf_weights(hf.path)
    return ImportedModel(import_model(config, state, source, gpt2_key_map(config)), tokenizer)


def save_hf_gpt2(model: nn.Module, directory: str | os.PathLike[str],
                 tokenizer: Tokenizer | None = None) -> Path:
    """Write a directory ``transformers.GPT2LMHeadModel`` (and ``AutoModelForCausalLM``, the
    text-generation pipeline, BLIP-2's ``llm_path``) loads: config.json, model.safetensors and
    the tokenizer files. Atomic."""
    model = family_model(model, CausalLM, "HF GPT2LMHeadModel")
    tensors = export_from(gpt2_key_map(model.config), model)
    return write_directory(directory, {CONFIG_FILE: hf_config_from_lm(model.config),
                                       WEIGHTS_FILE: tensors},
                           None if tokenizer is None else hf_readable(tokenizer))
