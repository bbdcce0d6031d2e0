"""The training config: every option of a run, its defaults and its checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vlp.cliargs import check_ranges, option
from vlp.config import check_fields
from vlp.data.sources import source_option
from vlp.data.transforms import AUGMENTS
from vlp.errors import ConfigError
from vlp.train.dashboards import parse_report_to
from vlp.train.distributed import STRATEGIES
from vlp.train.schedules import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# imagefolder: no captions
DATA_KINDS = ("auto", "csv", "tsv", "jsonl", "coco", "wds", "qa", "text")


@dataclass
class TrainConfig:
    """Every option of a run. Each field is also a ``vlp train`` flag (``--kebab-case``) with
    the field's default and help (`vlp.cliargs`)."""

    model: str = option("clip-tiny", "preset name (see vlp.list_models()), or a model / "
                        "checkpoint directory or hub name (hf-hub:ORG/REPO, open_clip:ARCH/TAG; "
                        "vlp train resolves it) whose weights start the run", section="model")
    model_overrides: dict[str, Any] = option(
        factory=dict, help="nested model config fields set over the preset's or the "
        "checkpoint's, e.g. {\"text\": {\"layers\": 2}}")
    tokenizer: str | None = option(None, "tokenizer directory, or a hub name (hf-hub:ORG/REPO, "
                                   "open_clip:ARCH/TAG; vlp train resolves it) (default: the "
                                   "init directory's, "
                                   "else --init-text's, else a standard vocabulary at hand "
                                   "that fits the model (CLIP's BPE for a 49,408-token text "
                                   "tower, with open_clip installed), else a BPE trained on the "
                                   "captions)")
    tokenizer_train_samples: int = option(
        1_000_000, "a BPE trained for a new run (no tokenizer at hand) learns from at most "
        "this many of the first captions (and as many text_data texts), on rank 0 "
        "before training starts", valid="positive_count")
    init_vision: str | None = option(None, "start the ViT (clip, coca, blip, blip2's vlp ViT) "
                                     "from a vision checkpoint: a transformers ViTModel / "
                                     "non-distilled DeiT / CLIPVisionModel / BLIP directory, an "
                                     "open_clip directory (its visual tower), a vlp model "
                                     "directory or a hub name; shapes must match the model")
    init_text: str | None = option(None, "start BLIP's text encoder, decoder and LM head, or "
                                   "BLIP-2's Q-Former (self-attention and FFNs; cross-attention "
                                   "stays fresh), from a transformers BERT directory "
                                   "(BertModel, BertForMaskedLM, ...) or a vlp BLIP directory")
    train_data: str = option("", "training data: a file or directory", section="data")
    train_kind: str = option("auto", "format of the training data; auto: from the path; qa: "
                             "VQA JSONL rows (image, question, answer(s)) that fine-tune the "
                             "answer decoder (blip, simvlm); text: text-only documents (.txt "
                             "lines or JSONL) for a language model (lm)", choices=DATA_KINDS)
    val_data: str | None = option(None, "validation data; its loss is computed at each "
                                  "evaluation")
    val_kind: str = option("auto", "format of the validation data", choices=DATA_KINDS)
    train_num_samples: int | None = option(
        None, "WebDataset training samples per epoch (default: counted; shard URLs are "
        "counted from their _stats.json only)", valid="positive_count")
    val_num_samples: int | None = option(None, "WebDataset validation samples (as "
                                         "train_num_samples)", valid="positive_count")
    dataset_resampled: bool = option(False, "WebDataset training shards drawn with "
                                     "replacement (seeded) instead of once per epoch")
    train_data_weights: str | None = option(
        None, "with dataset_resampled: '::'-joined weights, one per '::'-joined train_data "
        "pattern, the share of shard draws from each (e.g. 3::1)")
    image_key: str | None = source_option("image_key")
    caption_key: str | None = source_option("caption_key")
    separator: str | None = source_option("separator")
    image_root: str | None = source_option("image_root")
    text_data: str | None = option(None, "text-only corpus mixed into every batch, for models "
                                   "that train on text alone (simvlm): .txt (one text per line) "
                                   "or JSONL (caption_key, else text or caption)")
    text_ratio: float = option(0.5, "share of each batch's batch_size samples that are "
                               "text-only (with text_data)", valid="probability")
    lm_prompt: str | None = option(None, "text put before every training caption (one "
                                        "space between), its tokens left out of the captioning "
                                        "loss (blip; BLIP fine-tunes its captioner on 'a "
                                        "picture of ' + caption); caption with the same prompt")
    batch_size: int = option(64, "samples per optimizer micro-step; an update sees batch_size "
                             "* grad_accum", section="optimisation", valid="positive_count")
    grad_accum: int = option(1, "micro-batches per optimizer update", valid="positive_count")
    accum_features: bool = option(True, "with grad_accum > 1: contrastive losses over the whole "
                                  "accumulated batch, from features cached without grad (two "
                                  "forwards per sample); off: independent micro-batch losses")
    lr: float = option(5e-4, "peak learning rate", valid="positive")
    weight_decay: float = option(0.2, "AdamW weight decay", valid="non_negative")
    betas: tuple[float, float] = option((0.9, 0.98), "AdamW betas",
                                        metavar=("BETA1", "BETA2"), valid="beta")
    eps: float = option(1e-6, "AdamW epsilon", valid="positive")
    warmup_steps: int = option(0, "linear warmup steps to the peak lr", valid="count")
    min_lr_ratio: float = option(0.0, "the schedule ends at min_lr_ratio * lr (cosine, "
                                 "linear, constant-cooldown)", valid="probability")
    schedule: str = option("cosine", "learning rate after the warmup: cosine, constant, linear "
                           "(down to min_lr_ratio * lr at the last step), constant-cooldown "
                           "(constant, then cooldown_steps down to min_lr_ratio * lr)",
                           choices=SCHEDULES)
    cooldown_steps: int = option(0, "with schedule constant-cooldown: the last steps that "
                                 "decay the lr", valid="count")
    cooldown_power: float = option(1.0, "shape of the cooldown: 1 linear, 2 quadratic, ...",
                                   valid="positive")
    max_steps: int | None = option(None, "optimizer steps (with epochs too, whichever ends "
                                   "first)", valid="positive_count")
    epochs: int | None = option(None, "passes over the training data (with max_steps too, "
                                "whichever ends first)", valid="positive_count")
    grad_clip: float | None = option(1.0, "max gradient norm; 0 or None: no clipping (the norm "
                                     "is still logged)", valid="non_negative")
    max_nonfinite: int = option(10, "consecutive non-finite steps (each skipped) before the "
                                "run stops", valid="count")
    lock_image: bool = option(False, "freeze the image tower but its last "
                              "lock_image_unlocked_groups layer groups (groups: embeddings, "
                              "each block, final norm and heads)", section="fine-tuning")
    lock_image_unlocked_groups: int = option(0, "with lock_image: trailing groups left "
                                             "trainable (1: the heads, 2: the last block too, "
                                             "...)", valid="count")
    lock_text: bool = option(False, "freeze the text tower but its last "
                             "lock_text_unlocked_groups layer groups")
    lock_text_unlocked_groups: int = option(0, "with lock_text: trailing groups left "
                                            "trainable", valid="count")
    layer_decay: float = option(1.0, "layer-wise lr decay: group l of a tower's groups 0..L "
                                "trains at lr * layer_decay^(L - l); 1: off",
                                valid="probability")
    ema_decay: float | None = option(None, "keep an exponential moving average of the weights "
                                     "(ema = decay * ema + (1 - decay) * weights each step, "
                                     "e.g. 0.999); evaluation and the exported model use it",
                                     valid="probability")
    lora_rank: int = option(0, "LoRA adapters of this rank on lora_targets, every other weight "
                            "frozen (extra vlp[lora]); checkpoints hold the merged model; "
                            "0: off", valid="count")
    lora_alpha: float = option(16.0, "LoRA scale numerator (adapters scaled alpha / rank)",
                               valid="positive")
    lora_targets: str = option("qkv,q,kv,proj", "comma-separated names of the Linear modules "
                               "LoRA adapts (default: attention projections; fc1,fc2: MLPs)")
    lora_dropout: float = option(0.0, "dropout on the LoRA adapters' input",
                                 valid="probability")
    augment: str = option("clip", "training image augmentation: clip (random resized crop of "
                          "90-100% of the area, open_clip's default), blip (crop of 20-100% "
                          "and RandAugment(2, 5) with colour-keeping operations, BLIP's "
                          "pretraining), blip-finetune (crop of 50-100%, BLIP's fine-tuning), "
                          "none (the evaluation resize and centre crop)", choices=AUGMENTS)
    hflip: bool = option(False, "random horizontal flips in training (off by default: captions "
                         "name left and right)")
    output_dir: str = option("runs/train", "run directory", section="run")
    eval_every: int = option(0, "optimizer steps between evaluations (0: none); evaluation "
                             "also runs at the end", valid="count")
    checkpoint_every: int = option(0, "optimizer steps between checkpoints (0: none); a "
                                   "checkpoint is also written at the end", valid="count")
    keep_last: int = option(3, "checkpoints kept (0: all)", valid="count")
    log_every: int = option(10, "steps between progress updates (every step is still logged)",
                            valid="positive_count")
    seed: int = option(0, "random seed")
    num_workers: int = option(2, "data loader worker processes", valid="count")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda; under torchrun: "
                         "cuda:LOCAL_RANK")
    precision: str = option("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere; fp16 adds "
                            "loss scaling", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the model")
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass to "
                                      "save memory")
    resume: str | None = option(None, "'latest' (of output_dir; a fresh start when there is "
                                "none) or a checkpoint directory")
    resume_changes: bool = option(False, "resume although the model, tokenizer, optimizer "
                                  "settings or training data differ from the checkpoint's "
                                  "(the checkpoint's model, tokenizer and optimizer settings "
                                  "continue; train_config.json records what ran)")
    progress: bool = option(True, "show progress bars")
    report_to: str | None = option(None, "dashboards fed every scalar of log.jsonl as it is "
                                   "written, comma-separated (rank 0 only): tensorboard (events "
                                   "in output_dir/tensorboard; extra vlp[tensorboard]), wandb "
                                   "(project $WANDB_PROJECT, default vlp; WANDB_MODE=offline "
                                   "writes under output_dir/wandb; extra vlp[wandb])")
    strategy: str = option("ddp", "ddp, or fsdp (FSDP2, parameters sharded per block)",
                           choices=STRATEGIES, section="distributed runs (torchrun)")
    local_loss: bool = option(True, "each rank scores its own rows against the whole batch; "
                              "off: every rank computes the whole-batch contrastive loss")
    gather_with_grad: bool = option(True, "contrastive features are gathered with gradients; "
                                    "off: without (each rank's rows get only its own loss "
                                    "terms)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        check_fields(cls, data, "train config")
        values = dict(data)
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def check_config(cfg: TrainConfig) -> None:
    check_ranges(cfg, "train config")
    positive = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "log_every": cfg.log_every}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"train config {name}={value!r}: expected an int >= 1")
    for name in ("eval_every", "checkpoint_every", "keep_last", "warmup_steps", "num_workers",
                 "max_nonfinite"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"train config {name}={value!r}: expected an int >= 0")
    if cfg.max_steps is None and cfg.epochs is None:
        raise ConfigError("train config: set max_steps or epochs (or both)")
    for name in ("max_steps", "epochs"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"train config {name}={value!r}: expected an int >= 1 or None")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"train config precision={cfg.precision!r}; expected one of "
                          f"{list(PRECISIONS)}")
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"train config strategy={cfg.strategy!r}; expected one of "
                          f"{list(STRATEGIES)}")
    if cfg.hflip and cfg.augment == "none":
        raise ConfigError("train config hflip: augment 'none' trains on the evaluation "
                          "preprocessing; choose a preset that crops (clip, blip, "
                          "blip-finetune)")
    if cfg.layer_decay <= 0:
        raise ConfigError(f"train config layer_decay={cfg.layer_decay!r}: expected a value in "
                          "(0, 1]")
    if cfg.schedule == "constant-cooldown" and cfg.cooldown_steps < 1:
        raise ConfigError("train config schedule='constant-cooldown' needs cooldown_steps >= 1 "
                          "(the last steps, over which the lr decays)")
    if not cfg.train_data:
        raise ConfigError("train config train_data is empty; expected a data file or directory")
    parse_report_to(cfg.report_to)
    if cfg.text_data is not None:
        rows = text_rows(cfg)
        if not 0 < cfg.text_ratio < 1 or not 0 < rows < cfg.batch_size:
            raise ConfigError(f"train config text_ratio={cfg.text_ratio!r} with batch_size "
                              f"{cfg.batch_size} gives {rows} text-only rows per batch; "
                              "expected a ratio in (0, 1) leaving at least one row of each")


def text_rows(cfg: TrainConfig) -> int:
    """Text-only rows of each micro-batch; the image-text loader gives the rest."""
    return round(cfg.batch_size * cfg.text_ratio) if cfg.text_data is not None else 0
