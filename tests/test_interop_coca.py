"""Parity of vlp's CoCa with open_clip ``CoCa``: import, export, greedy captions, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

open_clip = pytest.importorskip("open_clip")

from open_clip.coca_model import CoCa as RefCoCa  # noqa: E402

from vlp.errors import CheckpointError, ConfigError  # noqa: E402
from vlp.interop.open_clip_coca import (  # noqa: E402
    coca_config_from_open_clip,
    load_open_clip_coca,
    save_open_clip_coca,
)
from vlp.models import build_model  # noqa: E402

ATOL = 1e-5
VOCAB, CONTEXT, IMAGE = 64, 12, 32  # OpenAI-BPE convention: sot 62, eot 63, pad 0
SOT, EOT = VOCAB - 2, VOCAB - 1
MODEL_CFG = {
    "embed_dim": 32,
    "custom_text": True,
    "vision_cfg": {"image_size": IMAGE, "patch_size": 8, "width": 48, "layers": 2,
                   "head_width": 16, "attentional_pool": True, "attn_pooler_queries": 9,
                   "attn_pooler_heads": 4, "output_tokens": True},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 4,
                 "layers": 2, "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 4,
                       "layers": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_model(seed: int = 0) -> RefCoCa:
    torch.manual_seed(seed)
    cfg = MODEL_CFG
    model = RefCoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"])
    with torch.no_grad():
        # open_clip never initialises its LM head (torch.empty); give it values, then make
        # biases / LayerNorms non-trivial so every key matters
        torch.nn.init.normal_(model.text_decoder.text_projection, std=32**-0.5)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def save_local_dir(model, directory, model_cfg=None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg or MODEL_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              directory / "open_clip_model.safetensors")


def padded_text(lengths, seed=1, context=CONTEXT, vocab=VOCAB) -> torch.Tensor:
    """Rows ``sot, words, eot, 0...`` like open_clip's tokenizer makes them; word ids avoid 0
    (open_clip's pad id) so that real words are never masked."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, vocab - 2, (length,), generator=generator)
        ids[row, 0], ids[row, length - 1] = vocab - 2, vocab - 1
    return ids


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)
    reference = reference_model()
    directory = tmp_path_factory.mktemp("open_clip_coca")
    save_local_dir(reference, directory)
    model, tokenizer = load_open_clip_coca(directory)
    return reference, model, directory


def test_import_matches_embeddings_and_caption_logits(pair):
    reference, model, _ = pair
    torch.manual_seed(3)
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    text = padded_text([4, 7, CONTEXT])  # the last row fills the context: CLS sees itself
    with torch.no_grad():
        out = reference(pixels, text)
        image = model.encode_image(pixels)
        words = model.encode_text(text)
        logits = model.caption_logits(pixels, text)[:, :-1]  # open_clip drops the last position
    diffs = {"image": (image - out["image_features"]).abs().max().item(),
             "text": (words - out["text_features"]).abs().max().item(),
             "logits": (logits - out["logits"]).abs().max().item()}
    assert all(d <= ATOL for d in diffs.values()), diffs
    assert model.config.pooler == "shared" and model.config.text_mask == "pad_id_legacy"
    assert (model.config.text.bos_id, model.config.text.eos_id) == (SOT, EOT)


def test_pad_id_inside_the_text_is_masked_like_open_clip(pair):
    reference, model, _ = pair
    text = padded_text([6, 9])
    text[:, 2] = 0  # open_clip's pad id is also a word ("!") in its BPE: hidden as a key
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        out = reference(pixels, text)
        torch.testing.assert_close(model.encode_text(text), out["text_features"], atol=ATOL,
                                   rtol=0)
        torch.testing.assert_close(model.caption_logits(pixels, text)[:, :-1], out["logits"],
                                   atol=ATOL, rtol=0)


def test_greedy_captions_match_open_clip_full_forward_decoding(pair):
    # open_clip 3.3.0's own generate() cannot run with transformers 4.57 (it imports the removed
    # BeamSearchScorer), so its top-k-1 path is written out: the argmax of its full forward's
    # last logits, re-run on the whole text each step. vlp decodes with its KV cache.
    reference, model, _ = pair
    torch.manual_seed(4)
    pixels = torch.randn(4, 3, IMAGE, IMAGE)
    steps = CONTEXT - 1
    text = torch.full((4, 1), SOT)
    with torch.no_grad():
        for _ in range(steps):
            logits = reference(pixels, text, output_labels=False)["logits"][:, -1]
            text = torch.cat([text, logits.argmax(dim=-1, keepdim=True)], dim=1)
    ours = model.generate(pixels, max_new_tokens=steps)
    for row in range(4):
        want = text[row, 1:].tolist()
        n = want.index(EOT) + 1 if EOT in want else len(want)
        assert ours[row, :n].tolist() == want[:n], (row, ours[row].tolist(), want)


def test_export_round_trips_into_open_clip(pair, tmp_path):
    reference, model, _ = pair
    directory = save_open_clip_coca(model, tmp_path / "export")
    exported = load_file(directory / "open_clip_model.safetensors")
    assert sorted(exported) == sorted(reference.state_dict())
    fresh = reference_model(seed=9)
    fresh.load_state_dict(exported, strict=True)
    pixels, text = torch.randn(2, 3, IMAGE, IMAGE), padded_text([5, 8])
    with torch.no_grad():
        a, b = fresh(pixels, text), reference(pixels, text)
    for key in ("image_features", "text_features", "logits"):
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    written = json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]
    again = coca_config_from_open_clip(written)
    assert again.decoder_layers == 2 and again.caption_queries == 9


def test_strict_errors(pair, tmp_path):
    reference, model, directory = pair
    state = load_file(directory / "open_clip_model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    packed = "text_decoder.cross_attn.1.attn.in_proj_weight"
    for broken, message in (
        ({k: v for k, v in state.items() if k != packed}, "missing key"),
        ({**state, packed: state[packed][:64]}, "expected 96 rows"),
        ({**state, "text_decoder.extra": torch.zeros(2)}, "unexpected key"),
        ({**state, "visual.proj": state["visual.proj"][:, :8].contiguous()}, "visual.proj"),
    ):
        save_file(broken, bad / "open_clip_model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            load_open_clip_coca(bad)
    paper = build_model(coca_config_from_open_clip(MODEL_CFG))
    paper.config.pooler = "separate"
    with pytest.raises(ConfigError, match="pooler"):
        save_open_clip_coca(paper, tmp_path / "nope")
    cascade = {**MODEL_CFG, "vision_cfg": {**MODEL_CFG["vision_cfg"],
                                           "attentional_pool": "cascade"}}
    with pytest.raises(CheckpointError, match="attentional_pool"):
        coca_config_from_open_clip(cascade)


@pytest.mark.slow
def test_full_coca_vit_b_32_shape_imports_and_exports(large_tmp_path):
    # open_clip's own coca_ViT-B-32 config (224 px, /32 patches, 12+12+12 layers, 49408 vocab,
    # context 76), random weights: the tiny model above cannot catch a shape-dependent slip
    model_cfg = open_clip.get_model_config("coca_ViT-B-32")
    torch.manual_seed(0)
    reference = open_clip.create_model("coca_ViT-B-32", pretrained=None)
    assert isinstance(reference, RefCoCa)
    width, context = model_cfg["text_cfg"]["width"], model_cfg["text_cfg"]["context_length"]
    vocab, size = model_cfg["text_cfg"]["vocab_size"], model_cfg["vision_cfg"]["image_size"]
    with torch.no_grad():
        torch.nn.init.normal_(reference.text_decoder.text_projection, std=width**-0.5)
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    reference.eval()
    save_local_dir(reference, large_tmp_path / "ref", model_cfg)
    model, _ = load_open_clip_coca(large_tmp_path / "ref")
    assert model.config.text.context_length == context and model.config.decoder_layers == 12
    pixels = torch.randn(2, 3, size, size)
    text = padded_text([9, context], seed=5, context=context, vocab=vocab)  # row 0 padded
    with torch.no_grad():
        out = reference(pixels, text)
        ours = {"image_features": model.encode_image(pixels),
                "text_features": model.encode_text(text),
                "logits": model.caption_logits(pixels, text)[:, :-1]}
    diffs = {key: (ours[key] - out[key]).abs().max().item() for key in ours}
    assert all(d <= ATOL for d in diffs.values()), diffs

    directory = save_open_clip_coca(model, large_tmp_path / "export")
    again = open_clip.create_model(f"local-dir:{directory}").eval()  # strict=True inside
    assert isinstance(again, RefCoCa)
    with torch.no_grad():
        back = again(pixels, text)
    for key in ("image_features", "text_features", "logits"):
        torch.testing.assert_close(back[key], out[key], atol=0, rtol=0)


def test_vlp_convert_cli_takes_coca_both_ways(pair, tmp_path):
    """`vlp convert --from open_clip` reads a CoCa local-dir (its config's multimodal tower
    says so) and `--to open_clip` writes one that open_clip loads with equal outputs."""
    from vlp.cli import main

    reference, _, directory = pair
    assert main(["convert", "--from", "open_clip", "--to", "vlp", str(directory),
                 str(tmp_path / "vlp")]) == 0
    assert main(["convert", "--from", "vlp", "--to", "open_clip", str(tmp_path / "vlp"),
                 str(tmp_path / "oc")]) == 0
    back = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    pixels, text = torch.randn(2, 3, IMAGE, IMAGE), padded_text([5, 8])
    with torch.no_grad():
        a, b = back(pixels, text), reference(pixels, text)
    for key in ("image_features", "text_features", "logits"):
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0)
