"""CapFilt mechanics on a tiny noisy synthetic world and an untrained blip-tiny: the Ray and
local backends write the same captions and decisions, a killed caption stage resumes without
redoing or losing units, the dataset and report are written, and bad input names its field."""

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

import vlp
from vlp.capfilt import CapfiltConfig, capfilt, plan
from vlp.capfilt.stages import caption_lengths, load_role, score_pairs
from vlp.capfilt.units import load_items
from vlp.config import get_preset
from vlp.data.synthetic import write_dataset
from vlp.errors import CheckpointError, ConfigError
from vlp.eval.captioning import generate_captions
from vlp.models import build_model
from vlp.tokenizers import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """16 images x 2 captions, 30% known noise: 4 WebDataset shards of 8 samples, train.csv."""
    root = tmp_path_factory.mktemp("capfilt_world")
    write_dataset(root, formats=("csv", "wds"), n_train=16, n_val=0, n_test=0,
                  captions_per_image=2, noisy_fraction=0.3, shard_size=8, progress=False)
    return root


def _save_blip(world, directory, **overrides):
    with open(world / "train.csv") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    tokenizer = train_tokenizer(captions * 2, vocab_size=1024, context_length=32)
    config = get_preset("blip-tiny")
    config.queue_size = 32
    config.text.pad_id, config.text.bos_id = tokenizer.pad_id, tokenizer.bos_id
    config.text.eos_id = tokenizer.eos_id
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    vlp.save(build_model(config), directory, tokenizer=tokenizer)
    return directory


@pytest.fixture(scope="module")
def blip(world, tmp_path_factory):
    return _save_blip(world, tmp_path_factory.mktemp("capfilt_model") / "blip")


def _config(world, blip, out, **fields):
    return CapfiltConfig(out=str(out), data=str(world / "wds" / "train"), captioner=str(blip),
                         filter=str(blip), num_captions=2, max_new_tokens=12, progress=False,
                         **fields)


def _median_itm(cfg):
    """A threshold that splits the untrained filter's scores on unit 0, so both decisions
    occur (an untrained ITM head scores every pair near 0.5)."""
    model, tokenizer = load_role(cfg, "filter")
    items = load_items(cfg, plan(cfg)[0])
    scores = score_pairs(model, tokenizer, [i.image for i in items], [i.captions for i in items])
    return statistics.median(s[0] for row in scores for s in row)


def _decisions(out):
    rows = []
    for path in sorted((out / "filtered").glob("unit-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return [(row["key"], c["source"], c["text"], c["kept"]) for row in rows
            for c in row["captions"]]


def test_ray_and_local_backends_write_the_same_captions_and_decisions(world, blip, tmp_path):
    ray = pytest.importorskip("ray")
    threshold = _median_itm(_config(world, blip, tmp_path / "probe"))
    local = _config(world, blip, tmp_path / "local", itm_threshold=threshold)
    result = capfilt(local)
    assert result["caption"] == {"units": 4, "done": 4, "skipped": 0}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = _config(world, blip, tmp_path / "ray", itm_threshold=threshold, backend="ray",
                         ray_actors=2)
        capfilt(remote, stages=("caption", "filter"))
    finally:
        ray.shutdown()
    for stage in ("captions", "filtered"):
        names = sorted(p.name for p in (tmp_path / "local" / stage).glob("unit-*.jsonl"))
        assert len(names) == 4
        for name in names:  # same bytes: captions, scores and decisions
            assert (tmp_path / "ray" / stage / name).read_bytes() == \
                (tmp_path / "local" / stage / name).read_bytes(), (stage, name)
    decisions = _decisions(tmp_path / "local")
    assert decisions == _decisions(tmp_path / "ray")
    assert {kept for *_, kept in decisions} == {True, False}
    assert sum(source == "synthetic" for _, source, _, _ in decisions) == 2 * 32


def test_written_dataset_and_report(world, blip, tmp_path):
    cfg = _config(world, blip, tmp_path / "out", shard_size=16, report_examples=4)
    summary = capfilt(cfg)["write"]
    dataset = tmp_path / "out" / "dataset"
    provenance = [json.loads(x) for x in (dataset / "provenance.jsonl").read_text().splitlines()]
    assert len(provenance) == 32 + 64  # every original and synthetic caption, kept or not
    kept = [row for row in provenance if row["kept"]]
    assert summary["kept_total"] == len(kept)
    with open(dataset / "train.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(kept) and all((dataset / r["filepath"]).is_file() for r in table)
    assert {r["source"] for r in provenance} == {"original", "synthetic"}
    # ground truth from the shards' json: noise metrics are defined and consistent
    noisy = sum(1 for r in provenance if r["source"] == "original" and r["noisy"])
    assert summary["noise_known"] and summary["noisy_original"] == noisy == 10
    assert summary["noise_rate_before"] == pytest.approx(noisy / 32, abs=1e-6)
    for key in ("noise_rate_after", "filter_precision", "filter_recall",
                "share_synthetic_kept"):
        assert key in summary
    shards = sorted((dataset / "wds").glob("*.tar"))
    assert len(shards) == -(-len(kept) // 16)
    samples = list(vlp.data.WebDatasetSource([str(s) for s in shards]))
    assert [s.text for s in samples] == [r["caption"] for r in table]
    assert json.loads((dataset / "summary.json").read_text())["kept_total"] == len(kept)
    page = (dataset / "report.html").read_text()
    assert "<table class='summary'>" in page and "filter_recall" in page
    assert page.count("<img src='data:image/jpeg;base64,") == 4
    assert "synthetic, ITM" in page and "original, ITM" in page
    # the bootstrapped CSV trains with the normal trainer (stage 5)
    cfg.pretrain_steps, cfg.pretrain_batch_size = 2, 8
    result = capfilt(cfg, stages=("pretrain",))["pretrain"]
    assert result["step"] == 2 and os.path.isdir(result["checkpoint"])


def test_killed_caption_stage_resumes_without_redoing_units(world, blip, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vlp", "capfilt", "caption", "--out", str(out),
               "--data", str(world / "wds" / "train"), "--captioner", str(blip),
               "--num-captions", "4", "--max-new-tokens", "30", "--prompt", "", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    captions = out / "captions"
    deadline = time.time() + 120
    while not list(captions.glob("unit-*.jsonl")) and process.poll() is None:
        assert time.time() < deadline, "no unit written in 120 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
                for p in captions.glob("unit-*.jsonl")}
    assert 1 <= len(finished) < 4, f"killed after {len(finished)} of 4 units"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["caption"] == {"units": 4, "done": 4 - len(finished),
                                                     "skipped": len(finished)}
    units = sorted(captions.glob("unit-*.jsonl"))
    assert not list(captions.glob(".unit-*"))  # a killed write's temporary file is gone
    assert [p.name for p in units] == [f"unit-{i:06d}.jsonl" for i in range(4)]
    for name, (inode, mtime) in finished.items():  # not rewritten
        stat = (captions / name).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == (inode, mtime)
    rows = [json.loads(line) for p in units for line in p.read_text().splitlines()]
    assert len(rows) == 32 and all(len(row["synthetic"]) == 4 for row in rows)
    # the same output as an uninterrupted run: each unit is seeded on its own
    fresh = CapfiltConfig(out=str(tmp_path / "fresh"), data=str(world / "wds" / "train"),
                          captioner=str(blip), num_captions=4, max_new_tokens=30,
                          prompt="", progress=False)
    capfilt(fresh, stages=("caption",))
    for path in units:
        assert path.read_bytes() == (tmp_path / "fresh" / "captions" / path.name).read_bytes()


def test_table_source_units_noise_and_finetune(world, blip, tmp_path):
    cfg = CapfiltConfig(out=str(tmp_path / "out"), data=str(world / "train.csv"),
                        unit_size=5, pretrained=str(blip), clean_data=str(world / "train.csv"),
                        finetune_steps=1, finetune_batch_size=4, num_captions=1,
                        max_new_tokens=8, progress=False)
    units = plan(cfg)
    assert [(u.start, u.stop) for u in units] == [(0, 5), (5, 10), (10, 15), (15, 16)]
    items = [item for unit in units for item in load_items(cfg, unit)]
    assert len(items) == 16 and all(len(item.captions) == 2 for item in items)
    noisy_file = world / "train_noisy.jsonl"
    assert sum(map(sum, (item.noisy for item in items))) == \
        len(noisy_file.read_text().splitlines())
    checkpoints = capfilt(cfg, stages=("finetune",))["finetune"]
    for role, objectives in (("captioner", ["lm"]), ("filter", ["itc", "itm"])):
        config = json.loads((tmp_path / "out" / "models" / role / "checkpoint-0000001"
                             / "config.json").read_text())
        assert config["objectives"] == objectives and role in checkpoints[role]
    summary = capfilt(cfg)["write"]  # models default to the fine-tuned ones
    assert summary["images"] == 16 and summary["synthetic_captions"] == 16
    assert summary["noise_known"]
    shared = CapfiltConfig(**{**cfg.to_dict(), "out": str(tmp_path / "shared"), "share": True})
    checkpoints = capfilt(shared, stages=("finetune",))["finetune"]
    assert checkpoints["captioner"] == checkpoints["filter"]
    assert "shared" in checkpoints["filter"]


def test_blip_objectives_switch_trains_a_subset():
    torch.manual_seed(0)
    config = get_preset("blip-tiny")
    config.queue_size, config.objectives = 16, ("lm",)
    model = build_model(config)
    batch = {"pixels": torch.randn(2, 3, 64, 64), "input_ids": torch.randint(3, 900, (2, 8))}
    out = model(batch)
    assert set(out["losses"]) == {"lm"}
    out["loss"].backward()
    assert model.itm_head.weight.grad is None and model.lm_head is not None
    config.objectives = ("itc", "itm")
    model = build_model(config)
    assert set(model(batch)["losses"]) == {"itc", "itm"}
    config.objectives = ("itc", "vqa")
    with pytest.raises(ConfigError, match="blip.objectives"):
        build_model(config)


def test_bad_input_names_the_field(world, blip, tmp_path):
    with pytest.raises(CheckpointError, match="captioner="):
        capfilt(_config(world, tmp_path / "missing", tmp_path / "a"))
    with pytest.raises(ConfigError, match="itm_threshold"):
        capfilt(_config(world, blip, tmp_path / "b", itm_threshold=1.5))
    with pytest.raises(ConfigError, match="itc_threshold"):
        capfilt(_config(world, blip, tmp_path / "b", itc_threshold=-2.0))
    no_itm = _save_blip(world, tmp_path / "no_itm", retrieval_heads=False, queue_size=0)
    cfg = _config(world, blip, tmp_path / "c")
    cfg.filter = str(no_itm)
    with pytest.raises(ConfigError, match="filter=.*retrieval_heads=False"):
        capfilt(cfg, stages=("filter",))
    with pytest.raises(ConfigError, match="pretrained"):
        capfilt(_config(world, blip, tmp_path / "d"), stages=("finetune",))
    with pytest.raises(ConfigError, match="filter: none given"):
        capfilt(CapfiltConfig(out=str(tmp_path / "e"), data=str(world / "train.csv"),
                              captioner=str(blip), progress=False), stages=("filter",))
    with pytest.raises(ConfigError, match="sampling='beam'"):
        capfilt(_config(world, blip, tmp_path / "f", sampling="beam"))
    # a resumed stage must repeat the settings its finished units were made with
    capfilt(_config(world, blip, tmp_path / "g"), stages=("caption",))
    with pytest.raises(ConfigError, match="seed: 0 -> 1"):
        capfilt(_config(world, blip, tmp_path / "g", seed=1), stages=("caption",))
    from vlp.cli import main

    code = main(["capfilt", "caption", "--out", str(tmp_path / "h"), "--data",
                 str(world / "train.csv"), "--captioner", str(blip), "--itm-threshold", "2"])
    assert code == 2


def test_ray_backend_without_ray_says_how_to_install(monkeypatch):
    from vlp.capfilt.backends import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'vlp\[ray\]'"):
        import_ray()


def test_unreadable_image_is_kept_out_with_its_reason(world, blip, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    good = world / "images" / "train" / "000000.jpg"
    (tmp_path / "web.csv").write_text(f"filepath,caption\n{good},a red circle\n"
                                      "broken.jpg,a blue square\n")
    cfg = CapfiltConfig(out=str(tmp_path / "out"), data=str(tmp_path / "web.csv"),
                        captioner=str(blip), filter=str(blip), max_new_tokens=6,
                        itm_threshold=0.0, progress=False)
    summary = capfilt(cfg)["write"]
    assert summary["unreadable_images"] == 1 and summary["images"] == 2
    assert summary["kept_original"] == 1 and not summary["noise_known"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "filtered" / "unit-000000.jsonl")
            .read_text().splitlines()]
    broken = next(row for row in rows if row["image"].endswith("broken.jpg"))
    assert broken["skipped"] == "corrupt_image"
    assert [(c["itm"], c["kept"]) for c in broken["captions"]] == [(None, False)]


def test_capfilt_demo_compares_three_pretraining_sets_with_one_recipe(tmp_path, monkeypatch):
    """The demo's loop at a toy budget: BLIP pretrain -> finetune -> caption -> filter ->
    write, then one recipe (model, steps, tokenizer) on noisy, bootstrapped and clean data.
    The learning bars (noise cut to a third, (b) above (a)) need the demo's budget."""
    import vlp.recipes.capfilt
    from vlp.recipes import DemoConfig, demo
    from vlp.recipes.capfilt import CAPFILT_DEFAULTS, capfilt_demo, format_table

    # a 3-step BLIP's ITM rejects every caption; keep them all so (b) has data to train on
    monkeypatch.setattr(vlp.recipes.capfilt, "ITM_THRESHOLD", 0.0)

    settings = {**CAPFILT_DEFAULTS, "n_web": 50, "n_clean": 16, "n_test": 24, "blip_steps": 3,
                "finetune_steps": 2, "steps": 3, "batch_size": 16}
    out = tmp_path / "demo"
    result = capfilt_demo(out, settings, seed=0, num_workers=0, progress=False)
    assert result["family"] == "capfilt" and result["noise_rate_before"] == 0.3, result
    assert set(result["runs"]) == {"a", "b", "c"}
    assert [result["runs"][k]["pairs"] for k in "ac"] == [50, 50]
    assert result["runs"]["b"]["pairs"] == result["kept_original"] + result["kept_synthetic"]
    configs = [json.loads((out / path / "train_config.json").read_text())
               for path in ("downstream/a", "capfilt/pretrain", "downstream/c")]
    for key in ("model", "max_steps", "batch_size", "lr", "weight_decay", "tokenizer", "seed"):
        assert configs[0][key] == configs[1][key] == configs[2][key], key
    assert (out / "capfilt" / "dataset" / "report.html").is_file()
    table = format_table(result)
    assert "(b) bootstrapped" in table and f"{result['runs']['a']['i2t_r1']:.1%}" in table
    with pytest.raises(ConfigError, match="family"):
        demo(DemoConfig(out=str(tmp_path / "x"), family="capfit"))


def test_captioner_learns_the_prompt_and_samples_with_blips_settings(world, blip, tmp_path):
    """Stage 1 fine-tunes the captioner on "a picture of " + caption (the filter on plain
    captions); stage 2 samples after that prompt with BLIP's top-p 0.9, top-k 50, repetition
    penalty 1.1 and minimum length, each a switch: top_k=1 turns the draws greedy."""
    cfg = CapfiltConfig(out=str(tmp_path / "out"), data=str(world / "train.csv"),
                        unit_size=16, pretrained=str(blip), clean_data=str(world / "train.csv"),
                        finetune_steps=1, finetune_batch_size=4, num_captions=1, progress=False)
    assert (cfg.prompt, cfg.top_p, cfg.top_k, cfg.repetition_penalty, cfg.min_new_tokens,
            cfg.max_new_tokens) == ("a picture of ", 0.9, 50, 1.1, None, None)
    capfilt(cfg, stages=("finetune", "caption"))
    runs = tmp_path / "out" / "models"
    for role, prompt in (("captioner", "a picture of "), ("filter", None)):
        ran = json.loads((runs / role / "train_config.json").read_text())
        assert ran["lm_prompt"] == prompt
        assert ran["model_overrides"]["alpha_warmup_steps"] is None  # this run's first epoch
    settings = json.loads((tmp_path / "out" / "captions" / "settings.json").read_text())
    assert {k: settings[k] for k in ("top_p", "top_k", "repetition_penalty",
                                     "prompt")} == {"top_p": 0.9, "top_k": 50,
                                                    "repetition_penalty": 1.1,
                                                    "prompt": "a picture of "}
    model, tokenizer = load_role(cfg, "captioner")
    used = 1 + len(tokenizer.encode("a picture of"))  # [DEC] and the prompt count, as in BLIP
    assert caption_lengths(cfg, tokenizer) == (10 - used, 30 - used)
    sampled = [row["synthetic"][0] for row in _caption_rows(tmp_path / "out")]
    assert all(len(tokenizer.encode(text)) >= 10 - used for text in sampled)  # minimum length
    greedy_cfg = CapfiltConfig(**{**cfg.to_dict(), "out": str(tmp_path / "greedy"),
                                  "captioner": str(runs / "captioner"), "top_k": 1})
    capfilt(greedy_cfg, stages=("caption",))
    items = load_items(greedy_cfg, plan(greedy_cfg)[0])
    expected = generate_captions(model, tokenizer, [item.image for item in items],
                                 num_beams=1, max_new_tokens=30 - used,
                                 min_new_tokens=10 - used,
                                 repetition_penalty=1.1, prompt="a picture of ", progress=False)
    greedy = [row["synthetic"][0] for row in _caption_rows(tmp_path / "greedy")]
    assert greedy == [text for _, text in expected.pairs]
    assert greedy != sampled


def _caption_rows(out):
    return [json.loads(line) for path in sorted((out / "captions").glob("unit-*.jsonl"))
            for line in path.read_text().splitlines()]
