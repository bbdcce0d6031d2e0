"""`vlp benchmark` on tiny fixtures written in each released layout from the synthetic world
(ImageNet folders, CIFAR binaries, Karpathy JSON, NoCaps, VQAv2 / OK-VQA JSON), every task run
through the command and checked against hand computations."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.benchmarks import probe
from vlp.benchmarks.classes import read_cifar, read_classification
from vlp.cli import main
from vlp.data.synthetic import generate
from vlp.data.synthetic_world import CLASS_NAMES

N_TRAIN, N_TEST, SIZE = 48, 12, 32
POOL = ["yes", "no", "red", "blue", "green", "circle", "square", "2", "3"]


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=95)


def _cifar_bytes(items, label_of, label_bytes: int) -> bytes:
    rows = []
    for item in items:
        pixels = np.asarray(item.image.convert("RGB"), dtype=np.uint8)  # (32, 32, 3)
        rows.append(bytes(label_of(item)) + pixels.transpose(2, 0, 1).tobytes())
    return b"".join(rows)


def _answers(item_index: int, qa_index: int, truth: str) -> list[str]:
    """Ten annotators: 0..4 of them give the true answer, the rest answers from the pool."""
    hits = (item_index + qa_index) % 5
    others = [a for a in POOL if a != truth]
    return [truth] * hits + [others[(item_index + j) % len(others)] for j in range(10 - hits)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    splits = {"train": generate("train", N_TRAIN, 0, image_size=SIZE, captions_per_image=5),
              "test": generate("test", N_TEST, 0, image_size=SIZE, captions_per_image=5)}
    present = sorted({item.class_name for items in splits.values() for item in items})
    wnid = {name: f"n{CLASS_NAMES.index(name) + 10**7:08d}" for name in present}
    # ImageNet / image folder: class-per-folder (wnid order == class-name order here)
    (root / "in").mkdir()
    (root / "in" / "LOC_synset_mapping.txt").write_text(
        "".join(f"{wnid[n]} {n}, a synonym\n" for n in sorted(present, key=wnid.get)))
    for split, items in splits.items():
        for i, item in enumerate(items):
            _save(item.image, root / "if" / split / item.class_name.replace(" ", "_")
                  / f"{i:04d}.jpg")
            in_split = "val" if split == "test" else "train"
            _save(item.image, root / "in" / in_split / wnid[item.class_name]
                  / f"ILSVRC2012_{in_split}_{i:08d}.JPEG")
    # CIFAR binaries: 10 classes (label mod 10) and 100 (the world's 48 as fine labels)
    c10, c100 = root / "cifar" / "cifar-10-batches-bin", root / "cifar" / "cifar-100-binary"
    c10.mkdir(parents=True), c100.mkdir(parents=True)
    (c10 / "batches.meta.txt").write_text("\n".join(CLASS_NAMES[:10]) + "\n\n")
    (c100 / "fine_label_names.txt").write_text("\n".join(n.replace(" ", "_")
                                                         for n in CLASS_NAMES) + "\n")
    (c10 / "test_batch.bin").write_bytes(_cifar_bytes(splits["test"],
                                                      lambda it: [it.label % 10], 1))
    for b in range(5):
        (c10 / f"data_batch_{b + 1}.bin").write_bytes(_cifar_bytes(
            splits["train"][b::5], lambda it: [it.label % 10], 1))
    for name, split in (("test.bin", "test"), ("train.bin", "train")):
        (c100 / name).write_bytes(_cifar_bytes(splits[split], lambda it: [0, it.label], 2))
    # COCO Karpathy + VQA (one root: val2014/COCO_val2014_%012d.jpg), Flickr30k, NoCaps
    coco, flickr, nocaps = root / "coco", root / "flickr", root / "nocaps"
    karpathy, f30k, questions, annotations, okvqa_q, okvqa_a = [], [], [], [], [], []
    nocaps_json = {"images": [], "annotations": []}
    for split, items in splits.items():
        for i, item in enumerate(items):
            cocoid = 1000 * (split == "test") + i
            file = f"COCO_val2014_{cocoid:012d}.jpg"
            _save(item.image, coco / "val2014" / file)
            kind = "test" if split == "test" else ("train", "restval")[i % 2]
            sentences = [{"raw": c, "tokens": c.split()} for c in item.captions]
            karpathy.append({"filepath": "val2014", "filename": file, "split": kind,
                             "cocoid": cocoid, "sentences": sentences})
            _save(item.image, flickr / "flickr30k-images" / f"{cocoid}.jpg")
            f30k.append({"filename": f"{cocoid}.jpg", "split": kind, "imgid": cocoid,
                         "sentences": sentences})
            if split != "test":
                continue
            domain = ("in-domain", "near-domain", "out-domain")[i % 3]
            _save(item.image, nocaps / "validation" / f"{i:04x}.jpg")
            nocaps_json["images"].append({"id": i, "file_name": f"{i:04x}.jpg",
                                          "domain": domain, "open_images_id": f"{i:04x}"})
            nocaps_json["annotations"] += [{"image_id": i, "id": 10 * i + j, "caption": c}
                                           for j, c in enumerate(item.captions)]
            for q, qa in enumerate(item.qa[:2]):
                qid = cocoid * 10 + q
                questions.append({"image_id": cocoid, "question": qa["question"],
                                  "question_id": qid})
                answers = _answers(i, q, qa["answer"])
                annotations.append({
                    "question_id": qid, "image_id": cocoid, "question_type": qa["type"],
                    "answer_type": "yes/no" if qa["answer"] in ("yes", "no") else "other",
                    "multiple_choice_answer": qa["answer"],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k, a in enumerate(answers)]})
            okvqa_q, okvqa_a = questions[::2], annotations[::2]
    (coco / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": f30k,
                                                               "dataset": "flickr30k"}))
    (nocaps / "nocaps_val_4500_captions.json").write_text(json.dumps(nocaps_json))
    for name, data in (("v2_OpenEnded_mscoco_val2014_questions.json", {"questions": questions}),
                       ("v2_mscoco_val2014_annotations.json", {"annotations": annotations}),
                       ("OpenEnded_mscoco_val2014_questions.json", {"questions": okvqa_q}),
                       ("mscoco_val2014_annotations.json", {"annotations": okvqa_a})):
        (coco / name).write_text(json.dumps(data))
    candidates = root / "candidates.txt"
    candidates.write_text("\n".join(sorted({a for r in annotations for a in
                                            (x["answer"] for x in r["answers"])})) + "\n")
    return {"root": root, "splits": splits, "present": present, "candidates": candidates}


@pytest.fixture(scope="module")
def models(world, tmp_path_factory):
    import vlp
    from vlp.tokenizers import train_tokenizer

    texts = [c for items in world["splits"].values() for item in items for c in item.captions]
    texts += [qa["question"] for item in world["splits"]["test"] for qa in item.qa] + POOL
    tokenizer = train_tokenizer(texts * 2, vocab_size=400, context_length=32)
    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    paths = {}
    for name in ("clip-tiny", "blip-tiny"):
        paths[name] = str(vlp.save(vlp.create_model(name), out / name, tokenizer=tokenizer))
    return paths


def test_cifar_binary_records_are_parsed_byte_by_byte(tmp_path):
    directory = tmp_path / "cifar-100-binary"
    directory.mkdir()
    pixels = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3, 32, 32) % 251
    records = [bytes([7, 1]) + pixels[0].astype(np.uint8).tobytes(),
               bytes([3, 0]) + pixels[1].astype(np.uint8).tobytes()]
    (directory / "test.bin").write_bytes(b"".join(records))
    (directory / "fine_label_names.txt").write_text("apple\naquarium_fish\n")
    data = read_cifar("cifar100", tmp_path, "test")
    assert data.classnames == ["apple", "aquarium fish"]
    assert [r.label for r in data.source] == [1, 0]  # the fine label, not the coarse one
    decoded = np.asarray(Image.open(io.BytesIO(data.source[0].image)))
    assert (decoded == pixels[0].transpose(1, 2, 0)).all()  # planes R, G, B -> HWC
    (directory / "test.bin").write_bytes(b"".join(records)[:-1])
    with pytest.raises(Exception, match="whole number of 3074-byte records"):
        read_cifar("cifar100", tmp_path, "test")


@pytest.mark.parametrize("fmt, official", [
    ("imagenet", "image-net.org"), ("cifar10", "cifar-10-batches-bin/batches.meta.txt"),
    ("cifar100", "cifar-100-binary/fine_label_names.txt"),
    ("coco-karpathy", "dataset_coco.json"), ("flickr30k-karpathy", "dataset_flickr30k.json"),
    ("nocaps", "nocaps_val_4500_captions.json"),
    ("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json"),
    ("okvqa", "OpenEnded_mscoco_val2014_questions.json")])
def test_a_missing_file_names_the_official_file_and_its_origin(fmt, official, models,
                                                               tmp_path, capsys):
    task = {"imagenet": "zeroshot", "cifar10": "zeroshot", "cifar100": "zeroshot",
            "vqav2": "vqa", "okvqa": "vqa"}.get(fmt, "retrieval")
    capsys.readouterr()
    assert main(["benchmark", models["clip-tiny"], "--task", task, "--format", fmt, "--root",
                 str(tmp_path), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and official in error[0] and "from" in error[0], error


def test_imagenet_class_names_come_from_the_users_file(world, tmp_path, capsys, models):
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    _save(world["splits"]["test"][0].image, tmp_path / "val" / "n01440764" / "a.JPEG")
    assert main(["benchmark", models["clip-tiny"], "--task", "zeroshot", "--format",
                 "imagenet", "--root", str(tmp_path), "--no-progress"]) == 2
    assert "vlp ships no ImageNet class names" in capsys.readouterr().err


def test_the_whole_imagenet_without_names_takes_open_clips_names_and_clip_templates(world,
                                                                                 tmp_path):
    zero_shot_metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    image = world["splits"]["test"][0].image
    wnids = [f"n{number:08d}" for number in range(1000)]
    for wnid in wnids:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        _save(image, tmp_path / "val" / wnid / "a.JPEG")
    data = read_classification("imagenet", tmp_path)
    assert data.classnames == list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert len(data.templates) == 80
    assert data.templates[0].replace("{}", "tench") == \
        zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES[0]("tench")
    assert [r.label for r in data.source][:3] == [0, 1, 2]
    (tmp_path / "classnames.txt").write_text("".join(f"c{i}\n" for i in range(1000)))
    assert read_classification("imagenet", tmp_path).classnames[:2] == ["c0", "c1"]


def test_zeroshot_on_every_classification_layout(world, models, bench):
    root = world["root"]
    folder = bench(models["clip-tiny"], "--task", "zeroshot", "--format",
                    "imagefolder", "--root", root / "if")
    imagenet = bench(models["clip-tiny"], "--task", "zeroshot", "--format",
                      "imagenet", "--root", root / "in")
    assert imagenet["split"] == "val" and imagenet["num_items"] == N_TEST
    # the same images and classes in two layouts: the same numbers
    for key in ("zeroshot_top1", "zeroshot_top5", "num_classes"):
        assert imagenet[key] == folder[key]
    assert imagenet["protocol"]["templates"][0] == "a photo of a {}."
    for fmt, classes in (("cifar10", 10), ("cifar100", 48)):
        result = bench(models["clip-tiny"], "--task", "zeroshot", "--format", fmt,
                        "--root", root / "cifar")
        assert result["num_items"] == N_TEST and result["num_classes"] == classes
        assert 0 <= result["zeroshot_top1"] <= result["zeroshot_top5"] <= 1


def _hand_recall(scores: torch.Tensor, text_to_image: list[int], k: int) -> tuple[float, float]:
    """R@k both ways from an explicit similarity matrix, by counting."""
    n, m = scores.shape
    i2t = 0
    for i in range(n):
        order = sorted(range(m), key=lambda t: -float(scores[i, t]))
        i2t += any(text_to_image[t] == i for t in order[:k])
    t2i = 0
    for t in range(m):
        order = sorted(range(n), key=lambda i: -float(scores[i, t]))
        t2i += text_to_image[t] in order[:k]
    return i2t / n, t2i / m


def test_retrieval_recall_equals_the_hand_count(world, models, bench):
    import vlp
    from vlp.eval import embed_images, embed_texts

    coco = world["root"] / "coco"
    result = bench(models["clip-tiny"], "--task", "retrieval", "--format",
                    "coco-karpathy", "--root", coco)
    assert result["num_items"] == N_TEST and result["num_texts"] == 5 * N_TEST
    karpathy = json.loads((coco / "dataset_coco.json").read_text())["images"]
    test = [im for im in karpathy if im["split"] == "test"]
    model, tokenizer = vlp.load(models["clip-tiny"]), vlp.load_tokenizer(models["clip-tiny"])
    images = embed_images(model, [str(coco / "val2014" / im["filename"]) for im in test],
                          progress=False).embeddings
    texts = [s["raw"] for im in test for s in im["sentences"]]
    text_to_image = [i for i, im in enumerate(test) for _ in im["sentences"]]
    scores = images @ embed_texts(model, tokenizer, texts, progress=False).T
    for k in (1, 5, 10):
        i2t, t2i = _hand_recall(scores, text_to_image, k)
        assert result[f"i2t_r{k}"] == pytest.approx(i2t, abs=1e-9)
        assert result[f"t2i_r{k}"] == pytest.approx(t2i, abs=1e-9)
    flickr = bench(models["clip-tiny"], "--task", "retrieval", "--format",
                    "flickr30k-karpathy", "--root", world["root"] / "flickr")
    assert flickr["i2t_r1"] == result["i2t_r1"] and flickr["t2i_r5"] == result["t2i_r5"]
    table = world["root"] / "test.csv"  # vlp's own caption file of the same pairs
    table.write_text("filepath,caption\n" + "".join(
        f"coco/val2014/{im['filename']},{s['raw']}\n" for im in test for s in im["sentences"]))
    own = bench(models["clip-tiny"], "--task", "retrieval", "--format", "csv",
                 "--root", table)
    assert own["split"] == "test" and own["t2i_r1"] == result["t2i_r1"]
    reranked = bench(models["blip-tiny"], "--task", "retrieval", "--format",
                      "coco-karpathy", "--root", coco, "--itm-k", "3")
    assert reranked["protocol"]["itm_k"] == 3
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert 0 <= reranked[f"itm_{key}"] <= 1 and key in reranked


def test_captioning_scores_and_the_coco_server_file(world, models, tmp_path, bench):
    from vlp.eval.captioning import caption_metrics

    coco = world["root"] / "coco"
    result = bench(models["blip-tiny"], "--task", "captioning", "--format",
                    "coco-karpathy", "--root", coco, "--num-beams", "1", "--max-new-tokens",
                    "5", "--caption-backend", "vlp", "--out", tmp_path)
    assert result["protocol"]["caption_backend"] == "vlp" and result["num_items"] == N_TEST
    rows = json.loads(Path(result["result_file"]).read_text())
    assert Path(result["result_file"]).name == "coco-karpathy-test-captioning_captions_results.json"
    assert sorted(r["image_id"] for r in rows) == [1000 + i for i in range(N_TEST)]
    references = {im["cocoid"]: [s["raw"] for s in im["sentences"]] for im in
                  json.loads((coco / "dataset_coco.json").read_text())["images"]}
    again = caption_metrics({r["image_id"]: references[r["image_id"]] for r in rows},
                            {r["image_id"]: r["caption"] for r in rows}, backend="vlp")
    for key in ("bleu_4", "rouge_l", "cider"):
        assert result[key] == pytest.approx(again[key], abs=1e-12)
    nocaps = bench(models["blip-tiny"], "--task", "captioning", "--format", "nocaps",
                    "--root", world["root"] / "nocaps", "--num-beams", "1",
                    "--max-new-tokens", "5", "--caption-backend", "vlp")
    assert nocaps["split"] == "val" and nocaps["num_items"] == N_TEST
    assert {"in-domain_cider", "near-domain_cider", "out-domain_cider"} <= set(nocaps)


def _official_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#humans who said it / 3, 1), averaged over the 10 sets of 9 annotators."""
    total = 0.0
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1:]
        total += min(sum(a == prediction for a in others) / 3, 1.0)
    return total / len(answers)


def test_official_accuracy_formula_on_hand_made_answers():
    assert _official_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert _official_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert _official_accuracy("red", ["red"] * 4 + ["blue"] * 6) == pytest.approx(1.0)
    from vlp.eval.vqa import vqa_accuracy

    for hits in range(6):
        answers = ["red"] * hits + ["blue"] * (10 - hits)
        assert vqa_accuracy("red", answers) == pytest.approx(_official_accuracy("red", answers))


@pytest.mark.parametrize("fmt, files", [
    ("vqav2", ("v2_OpenEnded_mscoco_val2014_questions.json",
               "v2_mscoco_val2014_annotations.json")),
    ("okvqa", ("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json"))])
def test_vqa_accuracy_equals_the_official_formula(fmt, files, world, models, tmp_path, bench):
    coco = world["root"] / "coco"
    result = bench(models["blip-tiny"], "--task", "vqa", "--format", fmt, "--root",
                    coco, "--vqa-mode", "rank", "--vqa-candidates", world["candidates"],
                    "--out", tmp_path)
    questions = json.loads((coco / files[0]).read_text())["questions"]
    annotations = {a["question_id"]: a for a in
                   json.loads((coco / files[1]).read_text())["annotations"]}
    rows = json.loads(Path(result["result_file"]).read_text())
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    scores, by_type = [], {}
    for row in rows:
        annotation = annotations[row["question_id"]]
        score = _official_accuracy(row["answer"], [a["answer"] for a in annotation["answers"]])
        scores.append(score)
        by_type.setdefault(annotation["answer_type"], []).append(score)
    assert result["num_items"] == len(questions) == result["num_questions"]
    assert result["vqa_accuracy"] == pytest.approx(sum(scores) / len(scores), abs=1e-12)
    for answer_type, values in by_type.items():
        assert result[f"vqa_acc_{answer_type}"] == pytest.approx(sum(values) / len(values))
    if fmt == "vqav2":  # vlp's own QA JSONL of the same questions: the same accuracy
        own = tmp_path / "val_qa.jsonl"
        own.write_text("".join(json.dumps({
            "image": f"val2014/COCO_val2014_{q['image_id']:012d}.jpg", "question": q["question"],
            "answers": [a["answer"] for a in annotations[q["question_id"]]["answers"]],
            "type": annotations[q["question_id"]]["answer_type"]}) + "\n" for q in questions))
        (tmp_path / "val2014").symlink_to(coco / "val2014")
        again = bench(models["blip-tiny"], "--task", "vqa", "--format", "qa", "--root",
                       own, "--vqa-mode", "rank", "--vqa-candidates", world["candidates"])
        assert again["vqa_accuracy"] == pytest.approx(result["vqa_accuracy"], abs=1e-12)


def _clusters(classes: int, per_class: int, dim: int, spread: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_linear_probe_separates_separable_features(one_thread):
    train_x, train_y = _clusters(5, 20, 8, 0.05, seed=0)
    generator = torch.Generator().manual_seed(1)
    test_x = train_x[::2] + 0.01 * torch.randn(len(train_x[::2]), 8, generator=generator)
    result = probe.linear_probe(train_x, train_y, test_x, train_y[::2], 5)
    assert result["probe_top1"] == 1.0 and result["probe_holdout_top1"] == 1.0
    assert result["probe_l2"] in probe.L2_GRID and result["num_train"] == 100


def test_few_shot_accuracy_rises_with_k(one_thread):
    features, labels = _clusters(6, 60, 16, 1.6, seed=3)
    train = torch.arange(len(labels)) % 3 != 0
    result = probe.few_shot(features[train], labels[train], features[~train], labels[~train],
                            6, shots=(1, 2, 4, 8, 16, 32), seeds=8)
    means = [result[f"fewshot_k{k}_mean"] for k in (1, 2, 4, 8, 16, 32)]
    assert means == sorted(means) and means[-1] > means[0] + 0.1, means
    assert all(result[f"fewshot_k{k}_std"] >= 0 for k in (1, 2, 4))


def test_linear_probe_and_few_shot_through_the_command(world, models, one_thread, bench):
    for fmt, root in (("imagefolder", world["root"] / "if"), ("cifar10",
                                                            world["root"] / "cifar")):
        result = bench(models["clip-tiny"], "--task", "linear-probe", "--format", fmt,
                        "--root", root, "--l2-grid", "1e-4", "1e-2")
        assert 0 <= result["probe_top1"] <= 1 and result["num_train"] == N_TRAIN
        assert result["probe_l2"] in (1e-4, 1e-2) and result["protocol"]["holdout"] == 0.2
    shots = bench(models["clip-tiny"], "--task", "few-shot", "--format", "cifar10",
                   "--root", world["root"] / "cifar", "--shots", "1", "2", "--seeds", "2")
    assert shots["protocol"]["shots"] == [1, 2] and shots["protocol"]["seeds"] == 2
    assert 0 <= shots["fewshot_k2_mean"] <= 1 and shots["fewshot_k1_std"] >= 0


def test_a_suite_in_a_subprocess_writes_tables_and_server_files(world, models, tmp_path):
    root = world["root"]
    suite = [
        {"task": "zeroshot", "format": "cifar10",  # relative to the suite file's directory
         "root": os.path.relpath(root / "cifar", tmp_path)},
        {"task": "retrieval", "format": "flickr30k-karpathy", "root": str(root / "flickr")},
        {"task": "captioning", "format": "coco-karpathy", "root": str(root / "coco"),
         "num_beams": 1, "caption_backend": "vlp", "name": "coco"},
        {"task": "vqa", "format": "vqav2", "root": str(root / "coco"), "vqa_mode": "rank",
         "vqa_candidates": str(world["candidates"]), "name": "vqav2"},
    ]
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "vlp", "benchmark", models["blip-tiny"],
                           "--suite", str(tmp_path / "suite.json"), "--out", str(out),
                           "--no-progress", "--num-workers", "0", "--batch-size", "16",
                           "--device", "cpu", "--max-new-tokens", "3"],  # entries' default
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["tasks"] == 4
    results = json.loads((out / "results.json").read_text())
    assert [r["task"] for r in results] == ["zeroshot", "retrieval", "captioning", "vqa"]
    assert results[2]["protocol"]["max_new_tokens"] == 3
    assert results[2]["protocol"]["num_beams"] == 1 and results[3]["protocol"]["num_beams"] == 3
    assert all(r["model"] == models["blip-tiny"] and r["num_items"] > 0 for r in results)
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"model", "dataset", "split", "num_items", "i2t_r1", "cider"} <= set(header)
    table = (out / "results.md").read_text()
    assert "| model | task | dataset | split | items |" in table and "cifar10" in table
    captions = json.loads((out / "coco_captions_results.json").read_text())
    assert set(captions[0]) == {"image_id", "caption"}
    answers = json.loads((out / "vqav2_vqa_results.json").read_text())
    assert set(answers[0]) == {"question_id", "answer"}


def test_yaml_suites_read_as_json_ones(tmp_path):
    yaml = pytest.importorskip("yaml")
    from vlp.benchmarks import read_suite

    entries = [{"task": "few-shot", "format": "cifar10", "root": "data", "shots": [1, 2]}]
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(entries))
    (tmp_path / "suite.json").write_text(json.dumps(entries))
    from_yaml, from_json = read_suite(tmp_path / "suite.yaml"), read_suite(tmp_path / "suite.json")
    assert from_yaml == from_json and from_yaml[0].shots == (1, 2)
    assert from_yaml[0].root == str(tmp_path / "data")


def test_bad_suite_entries_are_one_line_errors(tmp_path, models, capsys):
    suite = tmp_path / "suite.json"
    for entries, expected in (
            ([{"task": "zeroshot", "format": "cifar10", "root": ".", "colour": 1}],
             "unknown key(s) ['colour']"),
            ([{"task": "vqa", "format": "cifar10", "root": "."}], "does not serve task"),
            ({"task": "vqa"}, "expected a non-empty list")):
        suite.write_text(json.dumps(entries))
        capsys.readouterr()
        assert main(["benchmark", models["clip-tiny"], "--suite", str(suite), "--out",
                     str(tmp_path / "o")]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and expected in error[0], error
