"""BLIP's VQA (Li et al. 2022, §5.3): the question goes through the image-grounded encoder, and
the answer decoder generates (or scores) the answer cross-attending to the question states.

Training follows BLIP's VQA fine-tuning: each question's distinct annotator answers are
separate decoder rows, each weighted by its share of the answers (``answer_weight``; the
rows of question ``b`` are the next ``answer_count[b]``); a row's loss is its summed
(label-smoothed) token cross-entropy, and the batch loss is the weighted sum divided by the
number of questions, not tokens. A batch without ``answer_count`` has one answer per question,
weight 1.

The VQA layout (``config.vqa_layout``, BLIP's ``BLIP_VQA`` and HF's
``BlipForQuestionAnswering``) keeps the question encoder and the answer decoder as separate
towers (``share="none"``) and gives the decoder's cross-attention the text width it reads
(question states), whatever the vision width; fine-tuning VQA from a pretrained BLIP switches
to it (`BlipConfig.for_train_kind`) and `load_vqa_start` starts it from the pretrained
weights: question encoder from the text encoder, answer decoder from the captioning decoder;
cross-attention weights whose shape changed (vision width != text width) start fresh, and the
ITC/ITM heads and momentum encoders are left out.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from vlp.errors import CheckpointError, ConfigError
from vlp.losses import IGNORE_INDEX, caption_nll
from vlp.store.tensors import load_weights, read_safetensors


class BlipVQA:
    """The VQA methods of `vlp.models.blip.BLIP` (a mixin: it uses the model's towers)."""

    def _reads_images(self, what: str) -> None:
        """ConfigError unless the decoder's cross-attention can read image tokens."""
        config = self.config
        if config.vqa_layout and config.vision.width != config.text.width:
            raise ConfigError(f"{what}: this BLIP's answer decoder reads question states "
                              f"(vqa_layout, text width {config.text.width}), not image tokens "
                              f"(vision width {config.vision.width})")

    def _reads_questions(self, what: str) -> None:
        """ConfigError unless the decoder's cross-attention can read question states: the
        VQA layout's always can; a captioning decoder (it reads image tokens) only when the
        vision width is the text width."""
        config = self.config
        if not config.vqa_layout and config.vision.width != config.text.width:
            raise ConfigError(f"{what}: this BLIP's decoder cross-attends to image tokens "
                              f"(vision width {config.vision.width}) and cannot read question "
                              f"states (text width {config.text.width}); fine-tune it on VQA "
                              f"rows (train kind 'qa') or set vqa_layout=True")

    def question_states(self, pixels: Tensor, question_ids: Tensor,
                        question_mask: Tensor | None = None) -> Tensor:
        """``(B, Lq, text width)``: the question through the image-grounded encoder."""
        return self.grounded_text_states(self.image_tokens(pixels), question_ids, question_mask)

    def _answer_context(self, question_mask: Tensor, when: tuple[str, ...]) -> Tensor | None:
        return question_mask if self.config.mask_question_padding in when else None

    def vqa_answer_logits(self, pixels: Tensor, question_ids: Tensor, answer_ids: Tensor,
                          question_mask: Tensor | None = None,
                          answer_mask: Tensor | None = None,
                          answer_count: Tensor | None = None) -> Tensor:
        """``(A, La, vocab)`` next-token logits of each answer given its image and question;
        with ``answer_count`` (B,) question ``b`` has the next ``answer_count[b]`` answer rows
        (default: one each)."""
        self._reads_questions("vqa_answer_logits")
        if question_mask is None:
            question_mask = question_ids != self.config.text.pad_id
        states = self.question_states(pixels, question_ids, question_mask)
        context_mask = self._answer_context(question_mask, ("always", "teacher_forcing"))
        if answer_count is not None:
            if int(answer_count.sum()) != answer_ids.shape[0] or bool((answer_count < 1).any()):
                raise ConfigError(f"answer_count {answer_count.tolist()} must be positive and "
                                  f"add up to the {answer_ids.shape[0]} answer_ids rows")
            rows = torch.arange(states.shape[0], device=states.device)
            rows = rows.repeat_interleave(answer_count.to(states.device))
            states = states[rows]
            context_mask = None if context_mask is None else context_mask[rows]
        return self.decoder_logits(states, answer_ids, answer_mask, context_mask=context_mask)

    @torch.no_grad()
    def answer(self, pixels: Tensor, question_ids: Tensor, question_mask: Tensor | None = None,
               max_new_tokens: int = 10, **kwargs) -> Tensor:
        """Open-ended answers ``(B, T)`` generated from ``[DEC]``, each row ending with eos then
        pad_id; ``kwargs`` go to `vlp.generate.generate` (BLIP: num_beams=3)."""
        self._require("text_decoder", "answer")
        self._reads_questions("answer")
        if question_mask is None:
            question_mask = question_ids != self.config.text.pad_id
        states = self.question_states(pixels, question_ids, question_mask)
        start = torch.full((pixels.shape[0], 1), self.config.dec_id, dtype=torch.long,
                           device=pixels.device)
        return self._generate(states, self._answer_context(question_mask, ("always",)), start,
                              max_new_tokens, kwargs)

    @torch.no_grad()
    def rank_answers(self, pixels: Tensor, question_ids: Tensor, candidate_ids: Tensor,
                     question_mask: Tensor | None = None,
                     candidate_mask: Tensor | None = None) -> Tensor:
        """``(B, C)`` log-likelihood of each of C candidate answers (bos + tokens + eos, padded)
        under the answer decoder given image and question: BLIP's "rank" inference."""
        if question_mask is None:
            question_mask = question_ids != self.config.text.pad_id
        self._reads_questions("rank_answers")
        if candidate_mask is None:
            candidate_mask = candidate_ids != self.config.text.pad_id
        batch, count = question_ids.shape[0], candidate_ids.shape[0]
        states = self.question_states(pixels, question_ids, question_mask)  # (B, Lq, D)
        context_mask = self._answer_context(question_mask, ("always", "teacher_forcing"))
        rows = torch.arange(batch, device=states.device).repeat_interleave(count)  # (B*C,)
        answer_ids = candidate_ids.repeat(batch, 1)  # (B*C, La)
        answer_mask = candidate_mask.repeat(batch, 1).bool()
        logits = self.decoder_logits(states[rows], answer_ids, answer_mask,
                                     None if context_mask is None else context_mask[rows])
        log_probs = logits[:, :-1].float().log_softmax(-1)
        token_log_probs = log_probs.gather(-1, answer_ids[:, 1:, None])[..., 0]
        return (token_log_probs * answer_mask[:, 1:]).sum(1).view(batch, count)

    def _vqa_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A VQA batch (``pixels``, ``question_ids``, ``answer_ids``, optional masks,
        ``answer_count`` and ``answer_weight``): per answer row its weighted summed token NLL
        (``vqa_nll``), and a 1 per question (``vqa_questions``, the loss's divisor)."""
        answer_ids = batch["answer_ids"]
        answer_mask = batch.get("answer_mask")
        if answer_mask is None:
            answer_mask = answer_ids != self.config.text.pad_id
        answer_mask = answer_mask.bool()
        count, weight = batch.get("answer_count"), batch.get("answer_weight")
        questions = batch["question_ids"].shape[0]
        if weight is None:
            weight = torch.ones(answer_ids.shape[0], device=answer_ids.device)
        if count is None and answer_ids.shape[0] != questions:
            raise ConfigError(f"a VQA batch with {answer_ids.shape[0]} answer rows for "
                              f"{questions} questions needs 'answer_count'")
        if weight.shape != answer_ids.shape[:1]:
            raise ConfigError(f"answer_weight has shape {tuple(weight.shape)}; expected one "
                              f"weight per answer row ({answer_ids.shape[0]})")
        logits = self.vqa_answer_logits(batch["pixels"], batch["question_ids"], answer_ids,
                                        batch.get("question_mask"), answer_mask, count)
        labels = answer_ids[:, 1:].masked_fill(~answer_mask[:, 1:], IGNORE_INDEX)
        nll, _ = caption_nll(logits[:, :-1], labels, self.config.label_smoothing)
        return {"vqa_nll": weight.float() * nll,
                "vqa_questions": torch.ones(questions, device=nll.device)}

    @staticmethod
    def vqa_loss(features: dict[str, Tensor]) -> dict:
        """Weighted answer NLL summed, divided by the number of questions (BLIP)."""
        vqa = features["vqa_nll"].sum() / features["vqa_questions"].sum().clamp(min=1)
        return {"loss": vqa, "losses": {"vqa": vqa.detach()}}


def load_vqa_start(model, path: str | os.PathLike[str]) -> None:
    """Weights for a VQA-layout BLIP: a VQA-layout file loads strictly; a BLIP pretraining or
    captioning file (its towers saved under both names when shared) starts the question
    encoder from its text encoder and the answer decoder from its decoder, as BLIP fine-tunes
    VQA. Cross-attention weights of the decoder whose shape differs (vision width != text
    width) keep their fresh init; parts the VQA model lacks (heads, momentum encoders, queue)
    are left out. Anything else missing or misshapen is a CheckpointError."""
    tensors = read_safetensors(path)
    state = model.state_dict()
    if set(tensors) == set(state):
        load_weights(model, path)
        return
    fresh = [name for name, value in state.items() if name.startswith("text_decoder.")
             and ".cross" in name and name in tensors and tensors[name].shape != value.shape]
    missing = [name for name in state if name not in tensors]
    wrong = [f"{name} {tuple(tensors[name].shape)} vs {tuple(value.shape)}"
             for name, value in state.items()
             if name in tensors and name not in fresh and tensors[name].shape != value.shape]
    if missing or wrong:
        raise CheckpointError(f"{path}: cannot start this VQA BLIP from it; missing "
                              f"{missing[:5]}, shapes differ {wrong[:5]}")
    model.load_state_dict({name: tensors[name] for name in state if name not in fresh},
                          strict=False)
