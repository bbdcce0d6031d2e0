"""Parity of vlp's CLIP with HF transformers ``CLIPModel``: import, export, CLI, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTokenizerFast,
    CLIPVisionConfig,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

import vlp  # noqa: E402
from vlp.config import get_preset  # noqa: E402
from vlp.data.transforms import image_transform  # noqa: E402
from vlp.errors import CheckpointError, ConfigError  # noqa: E402
from vlp.interop import convert, load_hf, load_vlp, save_hf  # noqa: E402
from vlp.interop.hf import hf_config_from_clip  # noqa: E402
from vlp.models import build_model  # noqa: E402
from vlp.tokenizers import train_tokenizer  # noqa: E402

ATOL = 1e-5
VOCAB, BOS, EOS, PAD = 99, 97, 98, 0
IMAGE, CONTEXT = 30, 16


def tiny_hf_config(act: str = "quick_gelu", eos: int = EOS) -> CLIPConfig:
    # the HF tester's sizes (hidden 32, intermediate 37, 2 layers); eos set and used in inputs
    text = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=CONTEXT, hidden_act=act, pad_token_id=PAD,
                          bos_token_id=BOS, eos_token_id=eos)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, image_size=IMAGE, patch_size=6,
                              hidden_act=act)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=24)


def reference_model(config: CLIPConfig, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # HF's init leaves biases/LN at 0/1; randomise so every key matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


def padded_text(lengths: list[int], context: int = CONTEXT, seed: int = 1) -> tuple:
    """Right-padded rows ``bos, words, eos, pad...`` of the given lengths, and their mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), context), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, BOS, (length,), generator=generator)
        ids[row, 0], ids[row, length - 1] = BOS, EOS
        mask[row, :length] = 1
    return ids, mask


def hf_outputs(reference: CLIPModel, pixels, ids, mask=None, **kwargs) -> dict:
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=pixels, attention_mask=mask, **kwargs)
    return {"image": out.image_embeds, "text": out.text_embeds, "logits": out.logits_per_image}


def vlp_outputs(model, pixels, ids, mask=None) -> dict:
    with torch.no_grad():
        image = model.encode_image(pixels)
        text = model.encode_text(ids, attention_mask=mask)
        return {"image": image, "text": text, "logits": model.scale() * image @ text.T}


def diffs(a: dict, b: dict) -> dict[str, float]:
    """Max abs difference of image/text embeddings and logits."""
    return {key: (a[key] - b[key]).abs().max().item() for key in ("image", "text", "logits")}


def max_diffs(reference: CLIPModel, model, pixels, ids, mask=None, **kwargs) -> dict[str, float]:
    return diffs(hf_outputs(reference, pixels, ids, mask, **kwargs),
                 vlp_outputs(model, pixels, ids, mask))


def reference_diffs(a: CLIPModel, b: CLIPModel, pixels, ids, mask=None) -> dict[str, float]:
    return diffs(hf_outputs(a, pixels, ids, mask), hf_outputs(b, pixels, ids, mask))


def assert_close(diffs: dict[str, float], label: str) -> None:
    print(f"max abs diff {label}: {diffs}")  # shown with -s; collected for the closing note
    assert max(diffs.values()) <= ATOL, (label, diffs)


def run_cli(*argv: str) -> None:
    from vlp.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    assert code in (0, None)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_import_then_export_match_hf(act, tmp_path):
    reference = reference_model(tiny_hf_config(act))
    reference.save_pretrained(tmp_path / "hf")
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    ids, mask = padded_text([5, CONTEXT, 9])

    model, _ = load_hf(tmp_path / "hf")
    assert model.config.vision.act == model.config.text.act == act
    assert_close(max_diffs(reference, model, pixels, ids, mask), f"hf->vlp {act}")
    assert_close(max_diffs(reference, model, pixels, ids), f"hf->vlp {act} no mask")

    save_hf(model, tmp_path / "back")
    reloaded = CLIPModel.from_pretrained(tmp_path / "back").eval()
    assert_close(reference_diffs(reference, reloaded, pixels, ids, mask), f"vlp->hf {act}")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vlp_convert_cli_round_trip(act, tmp_path):
    reference = reference_model(tiny_hf_config(act), seed=2)
    reference.save_pretrained(tmp_path / "hf")
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    ids, mask = padded_text([7, 11])
    run_cli("convert", "--from", "hf", "--to", "vlp", str(tmp_path / "hf"), str(tmp_path / "v"))
    assert_close(max_diffs(reference, load_vlp(tmp_path / "v").model, pixels, ids, mask),
                 f"hf->vlp (cli) {act}")
    run_cli("convert", "--from", "vlp", "--to", "hf", str(tmp_path / "v"), str(tmp_path / "h2"))
    reloaded = CLIPModel.from_pretrained(tmp_path / "h2").eval()
    assert_close(reference_diffs(reference, reloaded, pixels, ids, mask), f"vlp->hf (cli) {act}")


def test_left_padding_with_mask_and_rows_without_eos(tmp_path):
    reference = reference_model(tiny_hf_config(), seed=3)
    reference.save_pretrained(tmp_path / "hf")
    model, _ = load_hf(tmp_path / "hf")
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    right, _ = padded_text([6, 10], seed=4)
    left = torch.stack([row.roll(CONTEXT - int((row != PAD).sum())) for row in right])
    mask = (left != PAD).long()
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # really left padded
    assert_close(max_diffs(reference, model, pixels, left, mask), "hf->vlp left padding")
    no_eos = right.clone()
    no_eos[no_eos == EOS] = 5  # HF pools index 0 then; eos_fallback="first" does the same
    assert_close(max_diffs(reference, model, pixels, no_eos), "hf->vlp rows without eos")


def test_legacy_eos_2_config_pools_by_argmax(tmp_path):
    reference = reference_model(tiny_hf_config(eos=2), seed=5)
    reference.save_pretrained(tmp_path / "hf")
    model, _ = load_hf(tmp_path / "hf")
    assert model.config.text.pool == "argmax"
    ids, mask = padded_text([7, 12], seed=6)
    ids[0, 3] = 96  # argmax lands elsewhere than the first eos
    ids[ids == EOS] = VOCAB - 1
    assert_close(max_diffs(reference, model, torch.randn(2, 3, IMAGE, IMAGE), ids, mask),
                 "hf->vlp legacy argmax")
    save_hf(model, tmp_path / "back")
    reloaded = CLIPModel.from_pretrained(tmp_path / "back").eval()
    assert_close(reference_diffs(reference, reloaded, torch.randn(2, 3, IMAGE, IMAGE), ids),
                 "vlp->hf legacy argmax")


def test_position_interpolation_matches_interpolate_pos_encoding(tmp_path):
    reference = reference_model(tiny_hf_config(), seed=7)
    reference.save_pretrained(tmp_path / "hf")
    model, _ = load_hf(tmp_path / "hf", image_size=48)
    assert model.config.vision.image_size == 48
    ids, mask = padded_text([4, 8])
    pixels = torch.randn(2, 3, 48, 48)
    diffs = max_diffs(reference, model, pixels, ids, mask, interpolate_pos_encoding=True)
    assert_close(diffs, "hf->vlp image_size 30->48")


def test_vlp_native_model_exports_to_hf(tmp_path):
    config = get_preset("clip-tiny")  # eos_id 1, bos_id 2: HF pools the first eos as vlp does
    config.vision.act = "gelu_tanh"
    torch.manual_seed(9)
    model = build_model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    save_hf(model, tmp_path / "hf")
    reloaded = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config.vision_config.hidden_act == "gelu_pytorch_tanh"
    ids = torch.zeros(2, 32, dtype=torch.long)
    ids[:, 0], ids[0, 1:5], ids[1, 1:9] = 2, torch.arange(10, 14), torch.arange(300, 308)
    ids[0, 5], ids[1, 9] = 1, 1
    assert_close(max_diffs(reloaded, model, torch.randn(2, 3, 64, 64), ids),
                 "vlp->hf clip-tiny (gelu_tanh vision)")


NATIVE_CAPTIONS = ["a red circle on a white background", "two blue squares", "a green star",
                   "a small yellow triangle above a purple circle"]
NATIVE_TEXTS = ["A red circle", "", "a blue square " * 10, "un café vert", "Two STARS!"]


def test_natively_trained_tokenizer_and_model_go_to_hf_and_open_clip(tmp_path):
    """The path nothing vlp-native could take before: train_tokenizer ids + clip-tiny preset ids
    -> vlp.save -> `vlp convert --to hf` -> transformers loads model and tokenizer."""
    tokenizer = train_tokenizer(NATIVE_CAPTIONS * 3, vocab_size=300, context_length=16)
    config = get_preset("clip-tiny")
    assert (config.text.pad_id, config.text.bos_id, config.text.eos_id) == (
        tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    config.embed_dim = 32
    config.vision.image_size, config.vision.width, config.vision.layers = 32, 32, 2
    config.text.width, config.text.layers = 32, 2
    config.text.context_length, config.text.vocab_size = 16, tokenizer.vocab_size
    torch.manual_seed(13)
    model = build_model(config).eval()
    with torch.no_grad():  # non-trivial biases / LayerNorms so every exported key matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    vlp.save(model, tmp_path / "v", tokenizer=tokenizer)
    run_cli("convert", "--from", "vlp", "--to", "hf", str(tmp_path / "v"), str(tmp_path / "hf"))

    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (exported.pad_token_id, exported.bos_token_id, exported.eos_token_id) == (0, 2, 1)
    encoded = exported(NATIVE_TEXTS, padding="max_length", max_length=16, truncation=True,
                       return_tensors="pt")
    ids = tokenizer(NATIVE_TEXTS)
    assert torch.equal(encoded.input_ids, ids)  # incl. truncation (eos last) and empty text
    reference = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert reference.config.text_config.eos_token_id == 1
    pixels = torch.randn(len(NATIVE_TEXTS), 3, 32, 32)
    assert_close(max_diffs(reference, model, pixels, encoded.input_ids, encoded.attention_mask),
                 "vlp-native (train_tokenizer) -> hf (cli)")

    open_clip = pytest.importorskip("open_clip")
    run_cli("convert", "--from", "vlp", "--to", "open_clip", str(tmp_path / "v"),
            str(tmp_path / "oc"))
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(NATIVE_TEXTS),
                       ids)
    oc_model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    with torch.no_grad():
        got = {"image": oc_model.encode_image(pixels, normalize=True),
               "text": oc_model.encode_text(ids, normalize=True)}
        got["logits"] = oc_model.logit_scale.exp() * got["image"] @ got["text"].T
    assert_close(diffs(vlp_outputs(model, pixels, ids), got),
                 "vlp-native (train_tokenizer) -> open_clip (cli)")


def test_core_works_without_the_reference_libraries(tmp_path):
    script = f"""
import sys
sys.modules["transformers"] = None  # any import of them now fails
sys.modules["open_clip"] = None
import torch, vlp, vlp.cli, vlp.interop
from vlp.config import get_preset
from vlp.models import build_model
model = build_model(get_preset("clip-tiny")).eval()
vlp.save(model, r"{tmp_path / 'v'}")
vlp.convert(r"{tmp_path / 'v'}", r"{tmp_path / 'h'}", src_format="vlp", dst_format="hf")
vlp.convert(r"{tmp_path / 'h'}", r"{tmp_path / 'o'}", src_format="hf", dst_format="open_clip")
vlp.convert(r"{tmp_path / 'o'}", r"{tmp_path / 'v2'}", src_format="open_clip", dst_format="vlp")
back = vlp.load(r"{tmp_path / 'v2'}")
pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(3, 1000, (2, 32))
ids[:, 0], ids[:, 20] = 2, 1  # clip-tiny's bos, eos
with torch.no_grad():
    assert torch.equal(model.encode_image(pixels), back.encode_image(pixels))
    assert torch.equal(model.encode_text(ids), back.encode_text(ids))
assert not any(m.startswith(("transformers", "open_clip")) for m in sys.modules
               if sys.modules[m] is not None)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def write_clip_bpe_files(directory) -> None:
    """A tiny CLIP BPE: the 512 byte symbols, a few merges, then the two specials."""
    symbols = list(bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"),
              ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>"), ("r", "e"), ("re", "d</w>")]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))


TEXTS = ["A photo of the cat.", "  the RED   cat's photo!! ", "café 42", "", "x" * 40]


def pil_image_processor(directory) -> CLIPImageProcessor:
    """HF's CLIP image processor on PIL, the reference vlp's eval transform follows. 4.57's
    ``CLIPImageProcessor`` is the PIL one; transformers 5 made a torchvision backend that class's
    default (its resize differs from PIL's by up to 1e-2 here) and kept PIL as
    ``CLIPImageProcessorPil``."""
    return getattr(transformers, "CLIPImageProcessorPil", CLIPImageProcessor).from_pretrained(
        directory)


def test_tokenizer_and_preprocessing_travel_with_the_model(tmp_path):
    write_clip_bpe_files(tmp_path / "bpe")
    # from the directory: transformers 5 ignores vocab_file/merges_file given to the class
    hf_tokenizer = CLIPTokenizerFast.from_pretrained(str(tmp_path / "bpe"))
    vocab = len(hf_tokenizer)
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=20,
                          eos_token_id=hf_tokenizer.eos_token_id,
                          bos_token_id=hf_tokenizer.bos_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, image_size=32, patch_size=8)
    reference = reference_model(CLIPConfig(text_config=text.to_dict(),
                                           vision_config=vision.to_dict(), projection_dim=16))
    reference.save_pretrained(tmp_path / "hf")
    hf_tokenizer.save_pretrained(tmp_path / "hf")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6],
                       resample=2).save_pretrained(tmp_path / "hf")

    model, tokenizer = load_hf(tmp_path / "hf")
    expected = hf_tokenizer(TEXTS, padding="max_length", max_length=20, truncation=True,
                            return_tensors="pt")
    ids = tokenizer(TEXTS)
    assert torch.equal(ids, expected.input_ids)
    vision_config = model.config.vision
    assert (vision_config.mean, vision_config.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert (vision_config.interpolation, vision_config.resize_mode) == ("bilinear", "shortest")
    pixels = torch.randn(len(TEXTS), 3, 32, 32)
    assert_close(max_diffs(reference, model, pixels, ids, expected.attention_mask),
                 "hf->vlp real tokenizer")

    convert(tmp_path / "hf", tmp_path / "v", "hf", "vlp")
    convert(tmp_path / "v", tmp_path / "back", "vlp", "hf")
    assert torch.equal(load_vlp(tmp_path / "v").tokenizer(TEXTS), expected.input_ids)
    exported = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert torch.equal(exported(TEXTS, padding="max_length", max_length=20, truncation=True,
                                return_tensors="pt").input_ids, expected.input_ids)
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "back")
    # list/dict on 4.57, tuple/SizeDict on transformers 5
    assert list(processor.image_mean) == [0.1, 0.2, 0.3] and processor.resample == 2
    assert (processor.crop_size["height"], processor.crop_size["width"]) == (32, 32)

    # pixels: vlp's eval transform from the imported config equals the HF processor's output
    # (an even crop margin: for odd margins HF's crop sits 1 px above/left of torchvision's)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 80, 3), np.uint8))
    expected_pixels = torch.from_numpy(pil_image_processor(tmp_path / "hf")(
        image, return_tensors="np")["pixel_values"][0])
    pixels_diff = (image_transform(model, train=False)(image) - expected_pixels).abs().max()
    assert pixels_diff <= ATOL


@pytest.mark.slow
def test_full_vit_b_32_shape(large_tmp_path):
    torch.manual_seed(11)
    reference = CLIPModel(CLIPConfig()).eval()  # HF defaults are the ViT-B/32 shape
    reference.save_pretrained(large_tmp_path / "hf")
    pixels = torch.randn(1, 3, 224, 224)
    ids = torch.full((2, 77), 49407)  # openai's tokenizer pads with eos
    ids[:, 0] = 49406
    ids[0, 1:6] = torch.tensor([320, 1125, 539, 320, 2368])
    ids[1, 1:3] = torch.tensor([1237, 4558])
    mask = (torch.arange(77) <= torch.tensor([[6], [3]])).long()
    expected = hf_outputs(reference, pixels, ids, mask)
    del reference

    convert(large_tmp_path / "hf", large_tmp_path / "v", "hf", "vlp")
    model = load_vlp(large_tmp_path / "v").model
    assert sum(p.numel() for p in model.parameters()) == 151_277_313
    assert_close(diffs(expected, vlp_outputs(model, pixels, ids, mask)), "hf->vlp ViT-B/32")
    save_hf(model, large_tmp_path / "back")
    del model
    reloaded = CLIPModel.from_pretrained(large_tmp_path / "back").eval()
    assert_close(diffs(expected, hf_outputs(reloaded, pixels, ids, mask)), "vlp->hf ViT-B/32")


# -- errors ----------------------------------------------------------------------------------------


@pytest.fixture()
def saved_tiny(tmp_path):
    reference_model(tiny_hf_config()).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_key_names_key_and_shape_and_writes_nothing(saved_tiny, tmp_path):
    weights = load_file(saved_tiny / "model.safetensors")
    del weights["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    save_file(weights, saved_tiny / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key 'text_model\.encoder\.layers\.1\."
                       r"self_attn\.k_proj\.weight' \(expected shape \(32, 32\)\)"):
        convert(saved_tiny, tmp_path / "out", "hf", "vlp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no dst, no temp dir


def test_wrong_shape_and_unexpected_key(saved_tiny):
    weights = load_file(saved_tiny / "model.safetensors")
    weights["visual_projection.weight"] = torch.zeros(24, 31)
    save_file(weights, saved_tiny / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'visual_projection\.weight' has shape \(24, 31\)"
                       r", expected \(24, 32\)"):
        load_hf(saved_tiny)
    weights["visual_projection.weight"] = torch.zeros(24, 32)
    weights["visual_projection.bias"] = torch.zeros(24)
    save_file(weights, saved_tiny / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key 'visual_projection\.bias'"):
        load_hf(saved_tiny)


def test_unknown_architecture_and_corrupt_files(saved_tiny):
    config = json.loads((saved_tiny / "config.json").read_text())
    (saved_tiny / "config.json").write_text(json.dumps({**config, "model_type": "siglip"}))
    with pytest.raises(CheckpointError, match="unknown architecture.*'siglip'"):
        load_hf(saved_tiny)
    (saved_tiny / "config.json").write_text(json.dumps(config))
    data = (saved_tiny / "model.safetensors").read_bytes()
    (saved_tiny / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_hf(saved_tiny)
    (saved_tiny / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_hf(saved_tiny)


def test_models_hf_cannot_express_are_refused(tmp_path):
    config = get_preset("clip-tiny")
    config.text.eos_id = 2  # HF would switch to argmax pooling
    with pytest.raises(ConfigError, match="eos_id 2"):
        hf_config_from_clip(config)
    config.text.eos_id, config.proj_bias = 5, True
    with pytest.raises(ConfigError, match="proj_bias"):
        save_hf(build_model(config), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_exported_clip_serves_transformers_zero_shot_pipeline(tmp_path):
    """`vlp convert --to hf` output in the transformers zero-shot image classification pipeline
    (its tokenizer files say what the model reads: no token_type_ids) gives vlp's scores."""
    from vlp.eval.zeroshot import zero_shot_classifier

    tokenizer = train_tokenizer(NATIVE_CAPTIONS * 3 + ["This is a photo of"] * 3,
                                vocab_size=300, context_length=32)
    config = get_preset("clip-tiny")
    config.text.vocab_size = tokenizer.vocab_size
    torch.manual_seed(5)
    model = build_model(config).eval()
    vlp.save(model, tmp_path / "v", tokenizer=tokenizer)
    run_cli("convert", "--from", "vlp", "--to", "hf", str(tmp_path / "v"), str(tmp_path / "hf"))
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path / "hf"))
    labels = ["red circle", "blue square", "green star"]
    size = config.vision.image_size  # no resize, so both sides read the same pixels
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3),
                                                              dtype=np.uint8))
    scores = {row["label"]: row["score"] for row in pipe(image, candidate_labels=labels)}
    weights = zero_shot_classifier(model, tokenizer, labels, ["This is a photo of {}."],
                                   progress=False)
    with torch.no_grad():
        pixels = image_transform(model, train=False)(image)[None]
        ours = (model.scale() * model.encode_image(pixels) @ weights).softmax(-1)[0]
    for label, probability in zip(labels, ours.tolist(), strict=True):
        assert abs(scores[label] - probability) <= ATOL, (label, scores, ours)
