"""Pretrained names (``hf-hub:ORG/REPO``, ``open_clip:ARCH/TAG``) resolved offline from a hub cache
the tests build in huggingface_hub's own layout (``models--ORG--REPO/refs`` +
``snapshots/<commit>/``), holding tiny random checkpoints saved by transformers and open_clip."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")
open_clip = pytest.importorskip("open_clip")

import test_interop_hf as hf_clip  # noqa: E402
import test_interop_hf_blip as hf_blip  # noqa: E402
import test_interop_hf_blip2 as hf_blip2  # noqa: E402
import test_interop_open_clip as oc  # noqa: E402
import test_interop_siglip as hf_siglip  # noqa: E402
import vlp  # noqa: E402
from vlp.errors import CheckpointError  # noqa: E402
from vlp.hub import SOURCE_FILE, resolve  # noqa: E402

ATOL = 1e-5


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub cache and an empty vlp cache for this test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "vlp"))
    return tmp_path


def snapshot(root, repo: str, tag: str = "v1", ref: str = "main"):
    """An empty snapshot directory of ``repo`` at a commit named after ``tag``, with the ref
    pointing at it (as ``hf download`` leaves it)."""
    commit = hashlib.sha1(f"{repo}@{tag}".encode()).hexdigest()
    base = root / "hf" / f"models--{repo.replace('/', '--')}"
    path = base / "snapshots" / commit
    path.mkdir(parents=True)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / ref).write_text(commit)
    return path


def entries(root) -> list:
    cache = root / "vlp" / "pretrained"
    return sorted(p for p in cache.rglob("*") if p.is_dir() and p.parent.parent == cache) \
        if cache.is_dir() else []


def test_clip_by_name_matches_transformers_and_converts_once(hub):
    reference = hf_clip.reference_model(hf_clip.tiny_hf_config())
    first = snapshot(hub, "org/tiny-clip")
    reference.save_pretrained(first)
    pixels = torch.randn(2, 3, hf_clip.IMAGE, hf_clip.IMAGE)
    ids, mask = hf_clip.padded_text([5, 9, 16])

    model = vlp.load("hf-hub:org/tiny-clip").eval()
    hf_clip.assert_close(hf_clip.max_diffs(reference, model, pixels, ids, mask), "hf-hub CLIP")
    [entry] = entries(hub)
    written = (entry / SOURCE_FILE).stat().st_mtime_ns
    assert json.loads((entry / SOURCE_FILE).read_text())["format"] == "hf"

    # the second load reads the converted directory: nothing is written again
    assert resolve("hf-hub:org/tiny-clip") == entry
    assert (entry / SOURCE_FILE).stat().st_mtime_ns == written and entries(hub) == [entry]

    # a new commit on main is a new entry; the old one stays reachable by revision
    changed = hf_clip.reference_model(hf_clip.tiny_hf_config(), seed=1)
    changed.save_pretrained(snapshot(hub, "org/tiny-clip", tag="v2"))
    model_v2 = vlp.load("hf-hub:org/tiny-clip").eval()
    hf_clip.assert_close(hf_clip.max_diffs(changed, model_v2, pixels, ids, mask), "new commit")
    assert len(entries(hub)) == 2
    assert resolve(f"hf-hub:org/tiny-clip@{first.name}") == entry


def test_siglip_by_name_matches_transformers(hub):
    reference = hf_siglip.reference(hf_siglip.tiny_config())
    reference.save_pretrained(snapshot(hub, "org/tiny-siglip"))
    pixels = torch.randn(2, 3, hf_siglip.IMAGE, hf_siglip.IMAGE)
    ids, _ = hf_siglip.texts([5, hf_siglip.CONTEXT])
    model = vlp.load("hf-hub:org/tiny-siglip").eval()
    hf_siglip.assert_close(hf_siglip.outputs_hf(reference, pixels, ids),
                           hf_siglip.outputs_vlp(model, pixels, ids), "hf-hub SigLIP")


def test_blip_captioner_by_name_matches_transformers(hub):
    reference = hf_blip.reference(transformers.BlipForConditionalGeneration, seed=3)
    reference.save_pretrained(snapshot(hub, "org/tiny-blip"))
    pix, (ids, mask) = hf_blip.pixels(seed=4), hf_blip.texts([9, 5, 12], seed=5)
    model = vlp.load("hf-hub:org/tiny-blip").eval()
    with torch.no_grad():
        expected = reference(pixel_values=pix, input_ids=ids, attention_mask=mask).logits
        hf_blip.assert_close(expected, model.caption_logits(pix, ids, mask), "hf-hub BLIP")


def test_blip2_by_name_matches_transformers(hub):
    reference = hf_blip2.reference(transformers.Blip2ForConditionalGeneration,
                                   hf_blip2.tiny_hf_config("opt"))
    reference.save_pretrained(snapshot(hub, "org/tiny-blip2"))
    pix, (ids, mask) = hf_blip2.pixels(), hf_blip2.llm_texts([7, 4, 9])
    model = vlp.load("hf-hub:org/tiny-blip2").eval()
    hf_ids, hf_mask = hf_blip2.with_image_tokens(ids, mask)
    with torch.no_grad():
        expected = reference(pixel_values=pix, input_ids=hf_ids, attention_mask=hf_mask).logits
        hf_blip2.assert_close(expected[:, hf_blip2.QUERIES:], model.llm_logits(pix, ids, mask),
                              "hf-hub BLIP-2")


def test_open_clip_snapshot_by_name_matches_open_clip(hub):
    model_cfg = oc.tiny_config(quick_gelu=True)
    reference = oc.reference_model(model_cfg)
    oc.save_local_dir(reference, model_cfg, snapshot(hub, "org/tiny-open-clip"))
    pixels, ids = torch.randn(2, 3, oc.IMAGE, oc.IMAGE), oc.padded_text([4, 12, 7])
    model = vlp.load("hf-hub:org/tiny-open-clip").eval()
    oc.assert_close(oc.diffs(oc.ref_outputs(reference, pixels, ids),
                             oc.vlp_outputs(model, pixels, ids)), "hf-hub open_clip")
    [entry] = entries(hub)
    assert json.loads((entry / SOURCE_FILE).read_text())["format"] == "open_clip"


def test_open_clip_pretrained_tags_map_to_their_hub_repos(hub):
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"].strip("/")
    model_cfg = oc.tiny_config(quick_gelu=False)
    reference = oc.reference_model(model_cfg, seed=2)
    oc.save_local_dir(reference, model_cfg, snapshot(hub, repo))
    model = vlp.load("open_clip:ViT-B-32/laion2b_s34b_b79k").eval()
    pixels, ids = torch.randn(1, 3, oc.IMAGE, oc.IMAGE), oc.padded_text([5])
    oc.assert_close(oc.diffs(oc.ref_outputs(reference, pixels, ids),
                             oc.vlp_outputs(model, pixels, ids)), "open_clip: name")
    with pytest.raises(vlp.ConfigError, match="no hub repo for this tag"):
        vlp.load("open_clip:ViT-B-32/no_such_tag")


def test_missing_and_corrupt_snapshots_give_one_line_and_write_nothing(hub):
    with pytest.raises(CheckpointError) as missing:
        vlp.load("hf-hub:org/not-fetched")
    message = str(missing.value)
    assert "\n" not in message and "not in the local hub cache" in message
    assert str(hub / "hf") in message and "hf download org/not-fetched" in message

    reference = hf_clip.reference_model(hf_clip.tiny_hf_config())
    broken = snapshot(hub, "org/broken")
    reference.save_pretrained(broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        vlp.load("hf-hub:org/broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        vlp.load("hf-hub:org/broken")
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="holds neither config.json nor"):
        vlp.load("hf-hub:org/broken")
    leftovers = list((hub / "vlp").rglob("*")) if (hub / "vlp").exists() else []
    assert not [p for p in leftovers if p.is_file()], leftovers


def test_a_local_directory_of_that_name_wins(hub, monkeypatch):
    model = vlp.create_model("clip-tiny")
    monkeypatch.chdir(hub)
    vlp.save(model, hub / "hf-hub:org" / "local")
    loaded = vlp.load("hf-hub:org/local")
    assert torch.equal(loaded.logit_scale, model.logit_scale) and entries(hub) == []


def test_cli_zeroshot_and_train_take_a_name(hub, tmp_path, synthetic_train_csv):
    """The command line resolves names the same way (a real process, the environment as a
    user sets it); vlp train fine-tunes from one."""
    trained = vlp.create_model("clip-tiny")
    captions = [f"a {c} shape" for c in ("red", "blue", "green")] * 20
    tokenizer = vlp.tokenizers.train_tokenizer(captions, vocab_size=300, context_length=32)
    vlp.save(trained, tmp_path / "native", tokenizer)
    vlp.convert(tmp_path / "native", tmp_path / "export", src_format="vlp", dst_format="hf")
    reference = transformers.CLIPModel.from_pretrained(tmp_path / "export")
    target = snapshot(hub, "org/tiny-native")
    reference.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json"):
        (target / name).write_bytes((tmp_path / "export" / name).read_bytes())
    data = tmp_path / "folder"
    for i, colour in enumerate(("red", "blue")):
        (data / colour).mkdir(parents=True)
        Image.new("RGB", (64, 64), ((255, 0, 0), (0, 0, 255))[i]).save(data / colour / "a.png")
    run = subprocess.run([sys.executable, "-m", "vlp", "zeroshot", "hf-hub:org/tiny-native",
                          "--data", str(data)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "top1" in json.dumps(result), result

    from vlp.cli import main
    assert main(["train", "--model", "hf-hub:org/tiny-native", "--train-data",
                 str(synthetic_train_csv(64)), "--batch-size", "16", "--max-steps", "2",
                 "--output-dir", str(tmp_path / "tuned"), "--no-progress"]) == 0
    tuned = vlp.load(tmp_path / "tuned")
    start = vlp.load("hf-hub:org/tiny-native")
    assert tuned.config == start.config
    assert not torch.equal(tuned.visual.patch_embed.weight, start.visual.patch_embed.weight)
    # a fresh model may take its tokenizer alone by name (the cached snapshot's, offline)
    assert main(["train", "--model", "clip-tiny", "--tokenizer", "hf-hub:org/tiny-native",
                 "--train-data", str(synthetic_train_csv(64)), "--batch-size", "16",
                 "--max-steps", "1", "--output-dir", str(tmp_path / "fresh"),
                 "--no-progress"]) == 0
    assert vlp.load_tokenizer(tmp_path / "fresh").backend.get_vocab() == \
        tokenizer.backend.get_vocab()
