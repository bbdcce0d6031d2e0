"""BLIP-2 stage 2 (arXiv 2301.12597 §3.3): projected query outputs as soft visual prompts to a
frozen HF LLM, for the LM loss and for generation.

Decoder-only LMs read ``[prompts; text]`` and are trained on the text after its prompt;
encoder-decoder LMs read ``[prompts; prefix text]`` in the encoder and are trained on the
suffix text in the decoder (the paper's prefix LM). Generation goes through the LLM's own
``generate`` on ``inputs_embeds`` (LAVIS and HF's reference path), so beam search, length
penalty and stopping are exactly the LLM's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.errors import ConfigError
from vlp.losses import IGNORE_INDEX, caption_nll


def with_visual_prompts(llm: nn.Module, prompts: Tensor, input_ids: Tensor | None,
                        attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``inputs_embeds`` = [prompts (B, Q, d); token embeddings of ``input_ids`` (B, T)] and
    their attention mask (prompts always visible), in the LLM's dtype."""
    embedding = llm.get_input_embeddings()
    prompts = prompts.to(embedding.weight.dtype)
    batch, num_prompts = prompts.shape[:2]
    visible = torch.ones(batch, num_prompts, dtype=torch.long, device=prompts.device)
    if input_ids is None:
        return prompts, visible
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    embeds = torch.cat([prompts, embedding(input_ids)], dim=1)
    return embeds, torch.cat([visible, attention_mask.long()], dim=1)


def mask_through_eos(input_ids: Tensor, eos_id: int | None) -> Tensor:
    """``(B, T)`` 1 up to and including each row's first eos after position 0 (bos may equal
    eos, and pad may too, as in GPT-2), 0 after it; all ones without an eos id."""
    if eos_id is None:
        return torch.ones_like(input_ids)
    is_eos = input_ids == eos_id
    is_eos[:, 0] = False
    seen = is_eos.long().cumsum(1) - is_eos.long()  # eos tokens strictly before each position
    return (seen == 0).long()


def causal_text_logits(llm: nn.Module, prompts: Tensor, input_ids: Tensor,
                       attention_mask: Tensor | None) -> Tensor:
    """``(B, T, vocab)`` logits at the text positions of a decoder-only LLM: position t
    predicts token t + 1."""
    embeds, mask = with_visual_prompts(llm, prompts, input_ids, attention_mask)
    logits = llm(inputs_embeds=embeds, attention_mask=mask).logits
    return logits[:, prompts.shape[1]:]


def causal_lm_nll(llm: nn.Module, prompts: Tensor, input_ids: Tensor, attention_mask: Tensor,
                  prompt_lengths: Tensor | None, label_smoothing: float
                  ) -> tuple[Tensor, Tensor]:
    """Per-row summed NLL and token count of the text after its first ``prompt_lengths``
    tokens (LAVIS: the prompt and the BOS are not targets; padding never is)."""
    logits = causal_text_logits(llm, prompts, input_ids, attention_mask)
    labels = input_ids[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), IGNORE_INDEX)
    if prompt_lengths is not None:
        positions = torch.arange(1, input_ids.shape[1], device=input_ids.device)
        labels = labels.masked_fill(positions[None] < prompt_lengths[:, None], IGNORE_INDEX)
    return caption_nll(logits[:, :-1], labels, label_smoothing)


def seq2seq_logits(llm: nn.Module, prompts: Tensor, input_ids: Tensor | None,
                   attention_mask: Tensor | None, labels: Tensor) -> Tensor:
    """``(B, L, vocab)`` decoder logits of an encoder-decoder LLM whose encoder reads
    [prompts; input_ids]; the decoder reads ``labels`` shifted right (its own convention,
    IGNORE_INDEX read as pad)."""
    embeds, mask = with_visual_prompts(llm, prompts, input_ids, attention_mask)
    return llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits


def prefix_lm_split(input_ids: Tensor, attention_mask: Tensor, eos_id: int, pad_id: int,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's prefix LM split of right-padded texts ending in eos: each row is cut at a
    random token k (0 <= k < length - 1, so the suffix keeps at least one token before eos);
    tokens [0, k) + eos go to the encoder, tokens [k, length) are the decoder targets.
    Returns encoder ids, encoder mask and labels (IGNORE_INDEX after each target)."""
    lengths = attention_mask.long().sum(1).tolist()
    rows = input_ids.tolist()
    cut = [int(torch.randint(0, max(1, n - 1), (), generator=generator)) for n in lengths]
    encoder = [row[:k] + [eos_id] for row, k in zip(rows, cut, strict=True)]
    targets = [row[k:n] for row, k, n in zip(rows, cut, lengths, strict=True)]
    enc_len, target_len = max(map(len, encoder)), max(map(len, targets))
    enc_ids = input_ids.new_full((len(rows), enc_len), pad_id)
    enc_mask = torch.zeros_like(enc_ids)
    labels = input_ids.new_full((len(rows), target_len), IGNORE_INDEX)
    for i, (enc, target) in enumerate(zip(encoder, targets, strict=True)):
        enc_ids[i, :len(enc)], enc_mask[i, :len(enc)] = torch.tensor(enc), 1
        labels[i, :len(target)] = torch.tensor(target)
    return enc_ids, enc_mask, labels


def seq2seq_lm_nll(llm: nn.Module, prompts: Tensor, input_ids: Tensor | None,
                   attention_mask: Tensor | None, labels: Tensor, label_smoothing: float
                   ) -> tuple[Tensor, Tensor]:
    logits = seq2seq_logits(llm, prompts, input_ids, attention_mask, labels)
    return caption_nll(logits, labels, label_smoothing)


@torch.no_grad()
def generate_from_prompts(llm: nn.Module, prompts: Tensor, prompt_ids: Tensor | None,
                          prompt_mask: Tensor | None, **kwargs) -> Tensor:
    """New tokens ``(B, T)`` from the LLM's own ``generate`` on [visual prompts; text prompt]
    (each row ends with eos, then the LLM's pad id); ``kwargs`` go to ``generate``
    (num_beams, length_penalty, max_new_tokens, min_new_tokens, ...)."""
    is_seq2seq = bool(llm.config.is_encoder_decoder)
    if prompt_ids is None and not is_seq2seq:
        bos = llm.config.bos_token_id
        if bos is None:
            raise ConfigError("a decoder-only LLM without bos_token_id needs prompt_ids")
        prompt_ids = torch.full((prompts.shape[0], 1), bos, dtype=torch.long,
                                device=prompts.device)
    embeds, mask = with_visual_prompts(llm, prompts, prompt_ids, prompt_mask)
    out = llm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    return out[:, 1:] if is_seq2seq else out  # seq2seq: drop the decoder start token
