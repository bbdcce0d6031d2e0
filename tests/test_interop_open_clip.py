"""Parity of vlp's CLIP with open_clip ``CLIP``: import, export, tokenizers, CLI, errors."""

import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

open_clip = pytest.importorskip("open_clip")

from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode  # noqa: E402

from vlp.data.transforms import image_transform  # noqa: E402
from vlp.errors import CheckpointError, ConfigError  # noqa: E402
from vlp.interop import convert, load_hf, load_open_clip, load_vlp, save_open_clip  # noqa: E402
from vlp.interop.open_clip import open_clip_config_from_clip  # noqa: E402
from vlp.models import build_model  # noqa: E402
from vlp.tokenizers import clip_bpe_tokenizer, load_tokenizer  # noqa: E402

ATOL = 1e-5
VOCAB, CONTEXT, IMAGE = 99, 12, 32  # open_clip convention: eot (98) is the highest id


def tiny_config(quick_gelu: bool, **text_cfg) -> dict:
    return {
        "embed_dim": 24,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": IMAGE, "patch_size": 8, "width": 32, "layers": 2,
                       "head_width": 8},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 4,
                     "layers": 2, **text_cfg},
    }


def reference_model(model_cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    with torch.no_grad():  # make biases / LayerNorms non-trivial so every key matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def save_local_dir(model, model_cfg: dict, directory, preprocess_cfg=None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              directory / "open_clip_model.safetensors")


def padded_text(lengths, context=CONTEXT, seed=1) -> torch.Tensor:
    """Rows ``sot, words, eot, 0...`` like open_clip's tokenizer makes them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, VOCAB - 2, (length,), generator=generator)
        ids[row, 0], ids[row, length - 1] = VOCAB - 2, VOCAB - 1
    return ids


def ref_outputs(reference, pixels, ids) -> dict:
    with torch.no_grad():
        image = reference.encode_image(pixels, normalize=True)
        text = reference.encode_text(ids, normalize=True)
        logits, _ = reference.get_logits(pixels, ids)
    return {"image": image, "text": text, "logits": logits}


def vlp_outputs(model, pixels, ids) -> dict:
    with torch.no_grad():
        logits, _ = model.logits(pixels, ids)
        return {"image": model.encode_image(pixels), "text": model.encode_text(ids),
                "logits": logits}


def diffs(a: dict, b: dict) -> dict[str, float]:
    return {key: (a[key] - b[key]).abs().max().item() for key in ("image", "text", "logits")}


def assert_close(found: dict[str, float], label: str) -> None:
    print(f"max abs diff {label}: {found}")  # shown with -s; collected for the closing note
    assert max(found.values()) <= ATOL, (label, found)


def run_cli(*argv: str) -> None:
    from vlp.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    assert code in (0, None)


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_import_then_export_match_open_clip(quick_gelu, tmp_path):
    model_cfg = tiny_config(quick_gelu)
    reference = reference_model(model_cfg)
    save_local_dir(reference, model_cfg, tmp_path / "oc")
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    ids = padded_text([4, CONTEXT, 7])
    expected = ref_outputs(reference, pixels, ids)

    model, _ = load_open_clip(tmp_path / "oc")
    assert model.config.text.act == ("quick_gelu" if quick_gelu else "gelu")
    label = "quick_gelu" if quick_gelu else "gelu"
    assert_close(diffs(expected, vlp_outputs(model, pixels, ids)), f"open_clip->vlp {label}")

    save_open_clip(model, tmp_path / "back")
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    assert_close(diffs(expected, ref_outputs(reloaded, pixels, ids)), f"vlp->open_clip {label}")
    # the other loader: a registered model config + pretrained=<weights file>
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / f"vlp-test-tiny-{label}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path / "cfg" / f"vlp-test-tiny-{label}.json")
    reloaded = open_clip.create_model(
        f"vlp-test-tiny-{label}", pretrained=str(tmp_path / "back" / "open_clip_model.safetensors"))
    assert_close(diffs(expected, ref_outputs(reloaded.eval(), pixels, ids)),
                 f"vlp->open_clip pretrained= {label}")


def test_bare_config_with_bin_state_dict_module_prefix_and_1d_logit_scale(tmp_path):
    model_cfg = tiny_config(True, pool_type="eos", eos_id=VOCAB - 1)
    model_cfg["vision_cfg"]["no_ln_pre"] = True
    model_cfg["nonscalar_logit_scale"] = True
    reference = reference_model(model_cfg, seed=4)
    assert reference.logit_scale.shape == (1,)
    (tmp_path / "ViT-tiny.json").write_text(json.dumps(model_cfg))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v
                                           for k, v in reference.state_dict().items()}},
               tmp_path / "epoch_3.pt")
    model, tokenizer = load_open_clip(tmp_path / "epoch_3.pt", config=tmp_path / "ViT-tiny.json")
    assert tokenizer is None and not model.config.vision.pre_norm
    assert (model.config.text.pool, model.config.text.eos_fallback) == ("eos", "first")
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    ids = padded_text([5, 9])
    ids[1, 8] = 3  # a row without eot: open_clip's "eos" pool takes index 0, so does vlp's
    assert_close(diffs(ref_outputs(reference, pixels, ids), vlp_outputs(model, pixels, ids)),
                 "open_clip->vlp .pt, eos pool, no ln_pre")


def test_custom_text_layout_and_logit_bias(tmp_path):
    model_cfg = {**tiny_config(False), "custom_text": True, "init_logit_bias": -10.0}
    torch.manual_seed(5)
    reference = open_clip.CustomTextCLIP(**{k: v for k, v in model_cfg.items()
                                            if k != "custom_text"}).eval()
    save_local_dir(reference, model_cfg, tmp_path / "oc")
    model, _ = load_open_clip(tmp_path / "oc")
    assert model.config.init_logit_bias == -10.0 and model.config.loss == "siglip"
    pixels, ids = torch.randn(2, 3, IMAGE, IMAGE), padded_text([6, 3])
    assert_close(diffs(ref_outputs(reference, pixels, ids), vlp_outputs(model, pixels, ids)),
                 "open_clip->vlp CustomTextCLIP + logit_bias")


def test_position_interpolation_matches_open_clip_loader(tmp_path):
    model_cfg = tiny_config(True)
    reference = reference_model(model_cfg, seed=6)
    save_local_dir(reference, model_cfg, tmp_path / "oc")
    bigger_cfg = json.loads(json.dumps(model_cfg))
    bigger_cfg["vision_cfg"]["image_size"] = 48
    resized = open_clip.CLIP(**bigger_cfg).eval()
    open_clip.load_checkpoint(resized, str(tmp_path / "oc" / "open_clip_model.safetensors"))
    model, _ = load_open_clip(tmp_path / "oc", image_size=48)
    pixels, ids = torch.randn(2, 3, 48, 48), padded_text([4, 8])
    assert_close(diffs(ref_outputs(resized, pixels, ids), vlp_outputs(model, pixels, ids)),
                 "open_clip->vlp image_size 32->48")


def test_open_clip_to_hf_via_cli(tmp_path):
    transformers = pytest.importorskip("transformers")
    model_cfg = tiny_config(True)
    reference = reference_model(model_cfg, seed=7)
    save_local_dir(reference, model_cfg, tmp_path / "oc")
    pixels, ids = torch.randn(2, 3, IMAGE, IMAGE), padded_text([5, CONTEXT])
    run_cli("convert", "--from", "open_clip", "--to", "hf", str(tmp_path / "oc"),
            str(tmp_path / "hf"))
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels)
    got = {"image": out.image_embeds, "text": out.text_embeds, "logits": out.logits_per_image}
    assert_close(diffs(ref_outputs(reference, pixels, ids), got), "open_clip->hf (cli)")
    run_cli("convert", "--from", "hf", "--to", "open_clip", str(tmp_path / "hf"),
            str(tmp_path / "oc2"))
    back = open_clip.create_model(f"local-dir:{tmp_path / 'oc2'}").eval()
    assert_close(diffs(ref_outputs(reference, pixels, ids), ref_outputs(back, pixels, ids)),
                 "hf->open_clip (cli)")
    assert load_hf(tmp_path / "hf").model.config.text.pool == "eos"  # eot is the highest id


def test_vlp_native_model_exports_to_open_clip(tmp_path):
    from vlp.config import get_preset

    config = get_preset("clip-tiny")  # eos pooling at id 1: open_clip's pool_type "eos"
    config.vision.pool, config.vision.pre_norm, config.vision.norm_eps = "mean", False, 1e-6
    torch.manual_seed(9)
    model = build_model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    save_open_clip(model, tmp_path / "oc")
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    pixels = torch.randn(2, 3, 64, 64)
    ids = torch.zeros(2, 32, dtype=torch.long)
    bos, eos = config.text.bos_id, config.text.eos_id
    assert (bos, eos) == (2, 1)
    ids[:, 0], ids[0, 1:5], ids[1, 1:9] = bos, torch.arange(10, 14), torch.arange(300, 308)
    ids[0, 5], ids[1, 9] = eos, eos
    assert_close(diffs(vlp_outputs(model, pixels, ids), ref_outputs(reloaded, pixels, ids)),
                 "vlp->open_clip clip-tiny (eos pool, mean pool, no ln_pre, eps 1e-6)")


# -- tokenizers ------------------------------------------------------------------------------------

MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"),
          ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>"), ("r", "e"), ("re", "d</w>"),
          ("'", "s</w>"), ("i", "n</w>")]
TEXTS = ["A photo of the cat.", "  the RED   cat's photo!!  ", "café 42°C naïve", "it's x'y",
         "tab\tand\nnewline", "日本語 🐶", "", "the cat " * 20]


def write_bpe(directory) -> tuple:
    """vocab.json + merges.txt in the order open_clip's SimpleTokenizer numbers its vocabulary
    (512 byte symbols, merges, then sot/eot), and the gzipped merges SimpleTokenizer reads."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text(merges_text)
    with gzip.open(directory / "merges.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write(merges_text)
    return directory / "vocab.json", directory / "merges.txt", len(tokens)


def test_clip_bpe_ids_equal_simple_tokenizer_and_clip_tokenizer_fast(tmp_path):
    vocab_file, merges_file, _ = write_bpe(tmp_path)
    simple = SimpleTokenizer(bpe_path=str(tmp_path / "merges.txt.gz"), context_length=16)
    ours = clip_bpe_tokenizer(vocab_file, merges_file, context_length=16,
                              pad_token=bytes_to_unicode()[ord("!")])  # open_clip pads with 0
    assert torch.equal(ours(TEXTS), simple(TEXTS))
    transformers = pytest.importorskip("transformers")
    # from the directory: transformers 5 ignores vocab_file/merges_file given to the class
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path))
    expected = fast(TEXTS, padding="max_length", max_length=16, truncation=True,
                    return_tensors="pt").input_ids
    assert torch.equal(clip_bpe_tokenizer(vocab_file, merges_file, context_length=16)(TEXTS),
                       expected)
    assert torch.equal(load_tokenizer(tmp_path, context_length=16)(TEXTS), expected)
    assert ours.decode(ours("the RED cat's photo")[0]) == "the red cat 's photo"


def test_tokenizer_travels_through_import_and_export(tmp_path):
    vocab_file, merges_file, vocab_size = write_bpe(tmp_path / "bpe")
    model_cfg = tiny_config(True)
    model_cfg["text_cfg"].update(vocab_size=vocab_size, context_length=16)
    reference = reference_model(model_cfg, seed=8)
    save_local_dir(reference, model_cfg, tmp_path / "oc")
    simple = SimpleTokenizer(bpe_path=str(tmp_path / "bpe" / "merges.txt.gz"), context_length=16)
    expected = simple(TEXTS)

    model, tokenizer = load_open_clip(tmp_path / "oc", tokenizer=(vocab_file, merges_file))
    assert torch.equal(tokenizer(TEXTS), expected)
    pixels = torch.randn(len(TEXTS), 3, IMAGE, IMAGE)
    assert_close(diffs(ref_outputs(reference, pixels, expected),
                       vlp_outputs(model, pixels, tokenizer(TEXTS))),
                 "open_clip->vlp real tokenizer")

    convert(tmp_path / "oc", tmp_path / "v", "open_clip", "vlp",
            tokenizer=(vocab_file, merges_file))
    assert torch.equal(load_vlp(tmp_path / "v").tokenizer(TEXTS), expected)
    convert(tmp_path / "v", tmp_path / "back", "vlp", "open_clip")
    exported = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'back'}")
    # exported for open_clip's HFTokenizer, which pads with the pad token: eot, not "!" (id 0)
    eot = vocab_size - 1
    after_eot = (expected == eot).cumsum(dim=1) - (expected == eot).long() > 0
    eot_padded = expected.masked_fill(after_eot, eot)
    assert torch.equal(exported(TEXTS), eot_padded)
    assert torch.equal(load_open_clip(tmp_path / "back").tokenizer(TEXTS), eot_padded)
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    assert_close(diffs(ref_outputs(reference, pixels, expected),
                       ref_outputs(reloaded, pixels, eot_padded)),
                 "vlp->open_clip real tokenizer, eot padding")


def test_preprocessing_comes_from_preprocess_cfg(tmp_path):
    model_cfg = tiny_config(False)
    save_local_dir(reference_model(model_cfg), model_cfg, tmp_path / "oc",
                   {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "resize_mode": "squash",
                    "interpolation": "bilinear"})
    vision = load_open_clip(tmp_path / "oc").model.config.vision
    assert (vision.mean, vision.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert (vision.resize_mode, vision.interpolation) == ("squash", "bilinear")
    convert(tmp_path / "oc", tmp_path / "back", "open_clip", "open_clip")
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'back'}")
    assert reloaded.visual.preprocess_cfg["mean"] == [0.1, 0.2, 0.3]
    assert reloaded.visual.preprocess_cfg["resize_mode"] == "squash"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), np.uint8))
    for mode in ("squash", "shortest"):  # pixels equal open_clip's own eval transform
        vision.resize_mode = mode
        expected = open_clip.image_transform(IMAGE, is_train=False, mean=vision.mean,
                                             std=vision.std, resize_mode=mode,
                                             interpolation="bilinear")(image)
        assert (image_transform(vision, train=False)(image) - expected).abs().max() <= ATOL
    model_cfg = tiny_config(False)
    save_local_dir(reference_model(model_cfg), model_cfg, tmp_path / "longest",
                   {"resize_mode": "longest"})
    with pytest.raises(ConfigError, match="resize_mode 'longest'"):
        load_open_clip(tmp_path / "longest")


@pytest.mark.slow
def test_full_vit_b_32(large_tmp_path):
    torch.manual_seed(12)
    reference = open_clip.create_model("ViT-B-32").eval()
    model_cfg = open_clip.get_model_config("ViT-B-32")
    save_local_dir(reference, model_cfg, large_tmp_path / "oc")
    pixels = torch.randn(1, 3, 224, 224)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, 0] = 49406
    ids[0, 1:7] = torch.tensor([320, 1125, 539, 320, 2368, 49407])
    ids[1, 1:4] = torch.tensor([1237, 4558, 49407])
    expected = ref_outputs(reference, pixels, ids)
    del reference

    convert(large_tmp_path / "oc", large_tmp_path / "v", "open_clip", "vlp")
    model = load_vlp(large_tmp_path / "v").model
    assert sum(p.numel() for p in model.parameters()) == 151_277_313
    assert_close(diffs(expected, vlp_outputs(model, pixels, ids)), "open_clip->vlp ViT-B-32")
    save_open_clip(model, large_tmp_path / "back")
    del model
    reloaded = open_clip.create_model(f"local-dir:{large_tmp_path / 'back'}").eval()
    assert_close(diffs(expected, ref_outputs(reloaded, pixels, ids)), "vlp->open_clip ViT-B-32")


# -- errors ----------------------------------------------------------------------------------------


@pytest.fixture()
def saved_tiny(tmp_path):
    model_cfg = tiny_config(True)
    save_local_dir(reference_model(model_cfg), model_cfg, tmp_path / "oc")
    return tmp_path / "oc"


def test_missing_key_and_wrong_shape_name_the_key_and_write_nothing(saved_tiny, tmp_path):
    weights_file = saved_tiny / "open_clip_model.safetensors"
    weights = load_file(weights_file)
    del weights["transformer.resblocks.1.attn.in_proj_weight"]
    save_file(weights, weights_file)
    with pytest.raises(CheckpointError, match=r"missing key 'transformer\.resblocks\.1\.attn\."
                       r"in_proj_weight' \(expected shape \(96, 32\)\)"):
        convert(saved_tiny, tmp_path / "out", "open_clip", "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oc"]  # no dst, no temp dir
    weights["transformer.resblocks.1.attn.in_proj_weight"] = torch.zeros(96, 32)
    weights["visual.proj"] = torch.zeros(24, 32)  # stored [out, in] by mistake
    save_file(weights, weights_file)
    with pytest.raises(CheckpointError, match=r"'visual\.proj' has shape \(24, 32\), "
                       r"expected \(32, 24\)"):
        load_open_clip(saved_tiny)


def test_unknown_architectures_and_corrupt_files(saved_tiny, tmp_path):
    config_file = saved_tiny / "open_clip_config.json"
    config = json.loads(config_file.read_text())
    resnet = json.loads(json.dumps(config))
    resnet["model_cfg"]["vision_cfg"]["layers"] = [3, 4, 6, 3]
    config_file.write_text(json.dumps(resnet))
    with pytest.raises(CheckpointError, match="ResNet"):
        load_open_clip(saved_tiny)
    coca = {**config, "model_cfg": {**config["model_cfg"], "multimodal_cfg": {"width": 32}}}
    config_file.write_text(json.dumps(coca))
    with pytest.raises(CheckpointError, match="'multimodal_cfg' is not supported"):
        load_open_clip(saved_tiny)
    config_file.write_text(json.dumps(config))
    (tmp_path / "broken.bin").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="broken.bin: not a readable weights-only"):
        load_open_clip(tmp_path / "broken.bin", config=config_file)


def test_models_open_clip_cannot_express_are_refused(tmp_path):
    from vlp.config import get_preset

    config = get_preset("clip-tiny")
    assert open_clip_config_from_clip(config)["model_cfg"]["text_cfg"]["pool_type"] == "eos"
    config.text.act = "gelu_tanh"
    with pytest.raises(ConfigError, match="gelu_tanh"):
        save_open_clip(build_model(config), tmp_path / "out")
    assert not (tmp_path / "out").exists()
