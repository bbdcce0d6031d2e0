"""The inference speedups: beams share their image's cross-attention keys and values, the image
path avoids copies and (opt-in, eval only) decodes large JPEGs reduced; and the benchmark
scripts that measure them run (at toy size; never a timed assertion)."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data.images import open_image, read_images
from vlp.data.transforms import ImageTransform
from vlp.generate import group_size, select_rows
from vlp.models.blip_decode import GroundedDecoder
from vlp.nn.attention import Attention

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def test_grouped_cross_attention_equals_repeated_context():
    torch.manual_seed(0)
    attention = Attention(16, 4, context_dim=12).eval()
    context = torch.randn(3, 7, 12)
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    x = torch.randn(6, 2, 16)  # two sequences per context row
    rows = torch.arange(3).repeat_interleave(2)
    key_mask = mask[:, None, None, :]
    with torch.no_grad():
        shared = attention.forward_cached(x, None, context=context, mask=key_mask)
        repeated = attention.forward_cached(x, None, context=context[rows],
                                            mask=key_mask[rows])
        step = torch.randn(6, 1, 16)
        shared_step = attention.forward_cached(step, shared.cache, mask=key_mask)
        repeated_step = attention.forward_cached(step, repeated.cache, mask=key_mask[rows])
    assert shared.cache.key.shape[0] == 3 and repeated.cache.key.shape[0] == 6
    torch.testing.assert_close(shared.output, repeated.output, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(shared_step.output, repeated_step.output, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot share"):
        attention.forward_cached(torch.randn(4, 1, 16), shared.cache, mask=key_mask)


def test_group_size_recognises_only_consecutive_equal_groups():
    assert group_size(torch.arange(4), 4) == 1
    assert group_size(torch.arange(4).repeat_interleave(3), 4) == 3
    assert group_size(torch.tensor([0, 1, 0, 1]), 2) is None
    assert group_size(torch.tensor([0, 0, 1]), 2) is None


def test_beam_state_reorders_self_caches_but_shares_the_image_once():
    import vlp

    torch.manual_seed(0)
    model = vlp.create_model("blip-tiny").eval()
    size = model.config.vision.image_size
    with torch.no_grad():
        tokens = model.image_tokens(torch.randn(2, 3, size, size))
        decoder = GroundedDecoder(model, tokens)
        rows = torch.arange(2).repeat_interleave(3)
        start = torch.full((6, 1), model.config.dec_id)
        logits, state = decoder.prefill(start, rows)
        assert state.shared is not None and state.shared.value[0][0].key.shape[0] == 2
        reordered = select_rows(state, torch.tensor([2, 0, 1, 3, 3, 4]))
        assert reordered.shared is state.shared  # not copied per beam
        assert reordered.caches[0].self_kv.key.shape[0] == 6
        next_logits, _ = decoder.step(logits.argmax(-1, keepdim=True), reordered)
        # the same step with the image copied per sequence (the general path)
        copied = GroundedDecoder(model, tokens[rows])
        _, full_state = copied.prefill(start, torch.arange(6))
        full = select_rows(full_state, torch.tensor([2, 0, 1, 3, 3, 4]))
        expected, _ = copied.step(logits.argmax(-1, keepdim=True), full)
    torch.testing.assert_close(next_logits, expected, atol=1e-5, rtol=1e-5)


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(np.sin(x / 17 + c) * 80 + 120 + y / 9) for c in range(3)], -1)
    pixels += rng.normal(0, 4, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG",
                                                                  quality=92)
    return buffer.getvalue()


def test_open_image_draft_decodes_reduced_but_never_below_the_size():
    data = _jpeg(1024, 768)
    assert open_image(data).size == (1024, 768)
    assert open_image(data, draft_size=224).size == (512, 384)  # 1/4 would be 192 < 224
    assert open_image(data, draft_size=400).size == (1024, 768)
    png = io.BytesIO()
    Image.new("RGB", (800, 600)).save(png, format="PNG")
    assert open_image(png.getvalue(), draft_size=100).size == (800, 600)  # JPEG only


def test_fast_decode_is_opt_in_eval_only_and_close_to_the_exact_path(tmp_path):
    files = []
    for i, (w, h) in enumerate(((1024, 768), (640, 480), (500, 375))):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(_jpeg(w, h, i))
    exact = ImageTransform(224, MEAN, STD, train=False)
    fast = ImageTransform(224, MEAN, STD, train=False, fast_decode=True)
    assert exact.draft_size is None and fast.draft_size == 224
    assert ImageTransform(224, MEAN, STD, train=True, fast_decode=True).draft_size is None
    reference = torch.stack([exact(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(read_images(files, exact).pixels, reference)  # default: unchanged
    approx = read_images(files, fast).pixels
    levels = (approx - reference).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
    assert levels.mean() < 2.0 and levels.max() < 40
    assert not torch.equal(approx, reference)  # it did take the fast path


def test_inference_benchmark_runs_at_toy_size(tmp_path):
    out = tmp_path / "inference.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inference.py"), "--toy",
                    "--only", "image_path_224", "--skip-sides", "transformers", "--repeats", "1",
                    "--out", str(out)],
                   check=True, cwd=ROOT, timeout=300)
    import json

    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert "error" not in row, row.get("error")
    assert row["outputs"]["vlp/open_clip"]["identical"]
    assert set(row["ratio"]) == {"vlp/open_clip"}
    assert row["vlp"]["peak_rss_mb"] > 0 and report["threads"] >= 1


def test_profile_benchmark_splits_a_run_at_toy_size(tmp_path):
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_inference.py"), "--toy",
                    "--only", "image_path_224", "--skip-sides", "transformers", "--repeats", "1",
                    "--out", str(out)],
                   check=True, cwd=ROOT, timeout=300, capture_output=True)
    import json

    (row,) = json.loads(out.read_text())["results"]
    assert "error" not in row, row.get("error")
    for side in ("vlp", "open_clip"):
        entry = row[side]
        assert 0 < entry["part_s"] and 0 < entry["part_share_of_run"] < 1.5
        assert abs(sum(entry["self_cpu_share_by_kind"].values()) - 1) < 0.01
    ratios = row["vlp/open_clip"]
    assert ratios["ceiling_if_rest_free"] > ratios["part"] > 0 and ratios["run"] > 0


def test_train_benchmark_records_each_librarys_optimizer(tmp_path):
    out = tmp_path / "train.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"),
                    "--models", "clip-tiny", "--batch", "4", "--steps", "1", "--repeats", "1",
                    "--warmup", "1", "--no-compile", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=300, capture_output=True)
    import json

    (row,) = json.loads(out.read_text())["results"]
    assert "error" not in row, row.get("error")
    assert row["vlp"]["optimizer"] == "fused"  # vlp's build_optimizer on CPU
    assert row["open_clip"]["optimizer"].startswith("default")  # open_clip_train's AdamW
    assert row["ratio_samples_per_s"] > 0


def test_gpu_suite_without_a_gpu_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite would run")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no CUDA GPU" in result.stderr
