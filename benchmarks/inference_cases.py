"""The measured pairs of benchmarks/inference.py: how each side is built and what one run does.

A case has ``prepare(settings, directory)`` (run once in the parent: writes the shared random
weights in the reference library's format and the inputs) and ``build(side, settings,
directory)`` (run in the side's own worker process) returning a ``Run``: ``run()`` performs one
timed unit of work and returns its output (token lists or a tensor) for the equality check.
Weights are random (every tensor drawn, so nothing is trivially zero) and converted between
the libraries through vlp's own converters (vlp.interop), so both sides compute with the same
numbers.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

VLP = "vlp"


@dataclass
class Run:
    run: Callable[[], Any]
    samples: int  # samples (captions, answers, images, texts) one run produces
    parameters: int
    # one part of ``run`` on its own (the image tower on the same pixels; Pillow's decode +
    # resize + crop of the image path), for benchmarks/profile_inference.py: the share of a
    # run that a change elsewhere cannot speed up
    part: Callable[[], Any] | None = None
    part_name: str = "image tower (the side's own encoder on the same pixels)"


def _draw_every_tensor(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """HF's own init leaves some towers at ~0 and every bias at 0; draw everything instead
    (LayerNorm weights around 1), from a private generator so the weights do not depend on how
    much global randomness the library's constructor used."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(1.0)


def cpu_serving_variant(model: nn.Module, side: str) -> nn.Module:
    """``vlp_bf16``: the model's weights in bfloat16 (CPUs with AVX512-BF16 / AMX run its
    matrix products natively); ``vlp_int8``: PyTorch's dynamic int8 quantization of every
    ``nn.Linear`` (weights int8, activations quantized per batch); ``vlp``: unchanged."""
    if side == "vlp_bf16":
        return model.to(torch.bfloat16)
    if side == "vlp_int8":
        import warnings

        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pixels(settings: dict, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.get("seed", 0) + 1)
    return torch.randn(settings["batch"], 3, size, size, generator=generator)


def _rows(tokens: torch.Tensor, skip: int, eos: int) -> list[list[int]]:
    """Token rows after ``skip`` prompt positions, each cut after its first eos."""
    out = []
    for row in tokens[:, skip:].tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


# -- BLIP (captioning, VQA) vs transformers -------------------------------------------------------

def blip_hf_config(settings: dict):
    from transformers import BlipConfig

    if settings.get("toy"):
        text = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=40, bos_token_id=117,
                    sep_token_id=102, pad_token_id=0)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=32, patch_size=8)
        return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)
    return BlipConfig()  # BLIP base: ViT-B/16 at 384 px, 12-layer BERT-base text, vocab 30524


def prepare_blip(kind: str):
    def prepare(settings: dict, directory: Path) -> None:
        from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

        cls = BlipForConditionalGeneration if kind == "caption" else BlipForQuestionAnswering
        model = cls(blip_hf_config(settings)).eval()
        _draw_every_tensor(model, settings.get("seed", 0))
        model.save_pretrained(directory / "hf")
    return prepare


def _questions(settings: dict, vocab: int, cls: int, sep: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(settings.get("seed", 0) + 2)
    batch, length = settings["batch"], settings["question_tokens"]
    ids = torch.randint(1000 if vocab > 2000 else 1, min(vocab - 10, 29000), (batch, length),
                        generator=generator)
    mask = torch.ones_like(ids)
    for row in range(batch):  # varied lengths, right-padded
        used = length - row % 3
        ids[row, used:], mask[row, used:] = 0, 0
        ids[row, 0], ids[row, used - 1] = cls, sep
    return ids, mask


def build_blip(kind: str):
    def build(side: str, settings: dict, directory: Path) -> Run:
        from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

        new, beams = settings["new_tokens"], settings["beams"]
        if side.startswith(VLP):
            from vlp.interop.hf_blip import load_hf_blip

            model, _ = load_hf_blip(directory / "hf")
            model = cpu_serving_variant(model.eval(), side)
        else:
            cls = BlipForConditionalGeneration if kind == "caption" else BlipForQuestionAnswering
            model = cls.from_pretrained(directory / "hf").eval()
        tower = (lambda: model.image_tokens(pixels)) if side.startswith(VLP) else (  # noqa: E731
            lambda: model.vision_model(pixel_values=pixels))
        config = json.loads((directory / "hf" / "config.json").read_text())
        text = config["text_config"]
        sep, size = text.get("sep_token_id", 102), config["vision_config"].get("image_size", 384)
        pixels = _pixels(settings, size)
        if side == "vlp_bf16":
            pixels = pixels.bfloat16()
        gen = dict(max_new_tokens=new, min_new_tokens=new, num_beams=beams)
        if kind == "caption":
            if side.startswith(VLP):
                def run():
                    return _rows(model.generate(pixels, early_stopping=False, **gen), 0, sep)
            else:
                def run():
                    return _rows(model.generate(pixel_values=pixels, **gen), 1, sep)
        else:
            question, mask = _questions(settings, text.get("vocab_size", 30524), 101, sep)
            if side == VLP:
                def run():
                    return _rows(model.answer(pixels, question, mask, early_stopping=False,
                                              **gen), 0, sep)
            else:
                def run():
                    return _rows(model.generate(input_ids=question, pixel_values=pixels,
                                                attention_mask=mask, **gen), 1, sep)
        return Run(run, settings["batch"], _count(model), tower)
    return build


# -- BLIP-2 (Q-Former + small OPT) vs transformers ------------------------------------------------

def blip2_hf_config(settings: dict):
    from transformers import Blip2Config, OPTConfig

    if settings.get("toy"):
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=32, patch_size=8)
        qformer = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=40,
                       encoder_hidden_size=32, use_qformer_text_input=False)
        opt = OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        ffn_dim=64, eos_token_id=2, pad_token_id=1, bos_token_id=0,
                        max_position_embeddings=64)
        queries = 4
    else:
        # the real Q-Former (12 layers, 768 wide, 32 queries, cross-attention every 2nd layer)
        # over a ViT-B/16 image tower at 224 px (ViT-g is too slow for a 2-core run), feeding
        # an OPT-125m-shaped language model
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, image_size=224, patch_size=16)
        qformer = dict(encoder_hidden_size=768, use_qformer_text_input=False)
        opt = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12,
                        num_attention_heads=12, ffn_dim=3072, eos_token_id=2, pad_token_id=1,
                        bos_token_id=2, max_position_embeddings=2048)
        queries = 32
    return Blip2Config(vision_config=vision, qformer_config=qformer,
                       text_config=opt.to_dict(), num_query_tokens=queries,
                       image_token_index=opt.vocab_size - 1)


def prepare_blip2(settings: dict, directory: Path) -> None:
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration(blip2_hf_config(settings)).eval()
    _draw_every_tensor(model, settings.get("seed", 0))
    model.save_pretrained(directory / "hf")


def build_blip2(side: str, settings: dict, directory: Path) -> Run:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config.from_pretrained(directory / "hf")
    queries, image_token = config.num_query_tokens, config.image_token_index
    bos, eos = config.text_config.bos_token_id, config.text_config.eos_token_id
    pixels = _pixels(settings, config.vision_config.image_size)
    batch, new = settings["batch"], settings["new_tokens"]
    gen = dict(max_new_tokens=new, min_new_tokens=new, num_beams=settings["beams"])
    prompt = torch.full((batch, 1), bos, dtype=torch.long)
    if side == VLP:
        from vlp.interop.hf_blip2 import load_hf_blip2

        model, _ = load_hf_blip2(directory / "hf")
        model.eval()

        def run():
            return _rows(model.generate(pixels, prompt, torch.ones_like(prompt), **gen), 0, eos)
    else:
        model = Blip2ForConditionalGeneration.from_pretrained(directory / "hf").eval()
        ids = torch.cat([torch.full((batch, queries), image_token), prompt], dim=1)

        def run():
            out = model.generate(pixel_values=pixels, input_ids=ids,
                                 attention_mask=torch.ones_like(ids), **gen)
            return _rows(out, out.shape[1] - new, eos)
    tower = (lambda: model.visual(pixels)) if side == VLP else (  # noqa: E731
        lambda: model.vision_model(pixel_values=pixels))
    return Run(run, batch, _count(model), tower)


# -- CLIP embedding vs open_clip and transformers -------------------------------------------------

def clip_vlp_config(settings: dict):
    from vlp.config import get_preset

    if settings.get("toy"):
        return get_preset("clip-tiny")
    return get_preset(settings["preset"])


def prepare_clip(settings: dict, directory: Path) -> None:
    from vlp.interop.hf import save_hf
    from vlp.interop.open_clip import save_open_clip
    from vlp.models import build_model

    torch.manual_seed(settings.get("seed", 0))
    model = build_model(clip_vlp_config(settings)).eval()
    torch.save(model.state_dict(), directory / "vlp.pt")
    save_open_clip(model, directory / "open_clip")
    save_hf(model, directory / "hf")


def _clip_text(settings: dict, config) -> torch.Tensor:
    """Captions of ~16 tokens ending in eos, padded to the context length (open_clip's layout)."""
    generator = torch.Generator().manual_seed(settings.get("seed", 0) + 3)
    text = config.text
    ids = torch.full((settings["batch"], text.context_length), text.pad_id)
    for row in range(settings["batch"]):
        used = 10 + row % 12
        ids[row, 1:used - 1] = torch.randint(300, text.vocab_size - 2, (used - 2,),
                                             generator=generator)
        ids[row, 0], ids[row, used - 1] = text.vocab_size - 2, text.eos_id  # sot, eot
    return ids


def build_clip(tower: str):
    def build(side: str, settings: dict, directory: Path) -> Run:
        config = clip_vlp_config(settings)
        pixels = _pixels(settings, config.vision.image_size)
        ids = _clip_text(settings, config)
        if side.startswith(VLP):
            from vlp.models import build_model

            model = build_model(config).eval()
            model.load_state_dict(torch.load(directory / "vlp.pt"))
            model = cpu_serving_variant(model, side)
            if side == "vlp_bf16":
                pixels = pixels.bfloat16()
            image = lambda: model.encode_image(pixels, normalize=False)  # noqa: E731
            text = lambda: model.encode_text(ids, normalize=False)  # noqa: E731
        elif side == "open_clip":
            import open_clip

            model = open_clip.create_model(f"local-dir:{directory / 'open_clip'}").eval()
            image = lambda: model.encode_image(pixels)  # noqa: E731
            text = lambda: model.encode_text(ids)  # noqa: E731
        else:
            from transformers import CLIPModel

            model = CLIPModel.from_pretrained(directory / "hf").eval()
            mask = (ids != config.text.pad_id).long()
            mask[:, 0] = 1

            def image():
                out = model.get_image_features(pixel_values=pixels)
                return getattr(out, "pooler_output", out)

            def text():
                out = model.get_text_features(input_ids=ids, attention_mask=mask)
                return getattr(out, "pooler_output", out)
        fn = image if tower == "image" else text

        def run():
            with torch.inference_mode():
                return fn()
        return Run(run, settings["batch"], _count(model))
    return build


# -- the image path: decode + resize + crop + normalise -------------------------------------------

WEB_SIZES = ((500, 375), (640, 480), (800, 600), (1024, 768), (375, 500), (768, 1024))


def _photo_like(width: int, height: int, seed: int):
    """A smooth scene with edges and mild noise: JPEG-decodes like a photo, unlike pure noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / (20 + 30 * rng.random()) + c) * 60 + 128
                     + y * rng.uniform(-0.1, 0.1) for c in range(3)], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        box = [x0, y0, x1, y1]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def prepare_images(settings: dict, directory: Path) -> None:
    folder = directory / "jpegs"
    folder.mkdir()
    sizes = WEB_SIZES[:2] if settings.get("toy") else WEB_SIZES
    for index in range(settings["images"]):
        width, height = sizes[index % len(sizes)]
        buffer = io.BytesIO()
        _photo_like(width, height, index).save(buffer, format="JPEG", quality=90)
        (folder / f"{index:04d}.jpg").write_bytes(buffer.getvalue())


def build_images(side: str, settings: dict, directory: Path) -> Run:
    from PIL import Image

    files = sorted((directory / "jpegs").glob("*.jpg"))
    size = settings["image_size"]
    if side == VLP:
        from vlp.data.images import read_images
        from vlp.data.transforms import ImageTransform

        transform = ImageTransform(size, (0.48145466, 0.4578275, 0.40821073),
                                   (0.26862954, 0.26130258, 0.27577711), train=False,
                                   fast_decode=settings.get("fast_decode", False))

        def run():
            return read_images(files, transform).pixels
    elif side == "open_clip":
        import open_clip

        transform = open_clip.image_transform(size, is_train=False)

        def run():
            return torch.stack([transform(Image.open(f)) for f in files])
    else:
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor(size={"shortest_edge": size},
                                       crop_size={"height": size, "width": size})

        def run():
            images = [Image.open(f).convert("RGB") for f in files]
            return processor(images=images, return_tensors="pt")["pixel_values"]
    def pillow():  # what every side leaves to Pillow: decode, resize, centre crop
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        return [TF.center_crop(TF.resize(Image.open(f).convert("RGB"), [size],
                                         interpolation=InterpolationMode.BICUBIC,
                                         antialias=True), [size, size]) for f in files]
    return Run(run, len(files), 0, pillow, "Pillow: JPEG decode + resize + centre crop")


# -- the registry ---------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    sides: tuple[str, ...]  # vlp first (then its CPU-serving variants), then the references
    prepare: Callable[[dict, Path], None]
    build: Callable[[str, dict, Path], Run]
    settings: dict
    compare: str  # "tokens": equal token rows; "tensor": max abs difference
    tolerance: float = 1e-4


def cases(toy: bool) -> list[Case]:
    big = not toy
    blip = dict(batch=8 if big else 2, new_tokens=20 if big else 5, toy=toy)
    out = [
        Case("blip_caption_greedy", (VLP, "vlp_bf16", "vlp_int8", "transformers"),
             prepare_blip("caption"),
             build_blip("caption"), {**blip, "beams": 1}, "tokens"),
        Case("blip_caption_beam3", (VLP, "transformers"), prepare_blip("caption"),
             build_blip("caption"), {**blip, "beams": 3}, "tokens"),
        Case("blip_vqa_beam3", (VLP, "transformers"), prepare_blip("vqa"), build_blip("vqa"),
             {**blip, "beams": 3, "new_tokens": 10 if big else 4, "question_tokens": 12},
             "tokens"),
        Case("blip2_opt_greedy", (VLP, "transformers"), prepare_blip2, build_blip2,
             {"batch": 8 if big else 2, "new_tokens": 20 if big else 5, "beams": 1, "toy": toy},
             "tokens"),
    ]
    for preset in ("clip-vit-b-32", "clip-vit-b-16"):
        for tower, batch in (("image", 16), ("text", 64)):
            variants = ("vlp_bf16", "vlp_int8") if tower == "image" and "16" in preset else ()
            out.append(Case(f"{preset}_{tower}_embedding",
                            (VLP, *variants, "open_clip", "transformers"),
                            prepare_clip, build_clip(tower),
                            {"preset": preset, "batch": batch if big else 4, "toy": toy},
                            "tensor", 1e-3))
        if toy:
            break
    images = {"images": 48 if big else 4, "image_size": 224, "threads": 1, "toy": toy}
    out.append(Case("image_path_224", (VLP, "open_clip", "transformers"), prepare_images,
                    build_images, images, "tensor", 1e-5))
    # eval-time fast_decode: reduced JPEG decoding + resampling only the kept square; its
    # pixel difference from the exact path is what the tolerance (normalised units) allows
    out.append(Case("image_path_224_fast_decode", (VLP, "open_clip", "transformers"),
                    prepare_images, build_images, {**images, "fast_decode": True}, "tensor",
                    0.3))
    return out
