"""`vlp benchmark` agrees with the tools people already trust, run on the same model object and
the same files: CLIP_benchmark's zero-shot classification and retrieval (its dataset builder
and metric functions, with vlp's model and image transform handed to them as its API expects),
and pycocoevalcap's COCO caption evaluation of the result file vlp writes for the server."""

import json
from pathlib import Path

import pytest
import torch

from vlp.data.synthetic import generate
from vlp.data.synthetic_world import CLASS_NAMES

pytest.importorskip("clip_benchmark")
pytest.importorskip("sklearn")  # CLIP_benchmark's zero-shot metrics import it

N_TEST, SIZE = 40, 32


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=95)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic world's test split as ImageNet (wnid folders + classnames.txt) and as the
    COCO Karpathy split (dataset_coco.json + val2014/), one root each."""
    root = tmp_path_factory.mktemp("parity")
    items = generate("test", N_TEST, 0, image_size=SIZE, captions_per_image=5)
    present = sorted({item.class_name for item in items}, key=CLASS_NAMES.index)
    wnid = {name: f"n{CLASS_NAMES.index(name) + 10**7:08d}" for name in present}
    (root / "in").mkdir()
    (root / "in" / "classnames.txt").write_text("".join(f"{n}\n" for n in present))
    images = []
    for i, item in enumerate(items):
        _save(item.image, root / "in" / "val" / wnid[item.class_name] / f"{i:08d}.JPEG")
        file = f"COCO_val2014_{i:012d}.jpg"
        _save(item.image, root / "coco" / "val2014" / file)
        images.append({"filepath": "val2014", "filename": file, "split": "test", "cocoid": i,
                       "sentences": [{"raw": c, "tokens": c.split()} for c in item.captions]})
    (root / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images,
                                                                 "dataset": "coco"}))
    return {"root": root, "classnames": present, "items": items}


@pytest.fixture(scope="module")
def model_dir(data, tmp_path_factory):
    import vlp
    from vlp.tokenizers import train_tokenizer

    texts = [c for item in data["items"] for c in item.captions]
    texts += [f"a photo of a {name}." for name in CLASS_NAMES]
    tokenizer = train_tokenizer(texts * 2, vocab_size=400, context_length=32)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models")
    return {name: str(vlp.save(vlp.create_model(name), out / name, tokenizer=tokenizer))
            for name in ("clip-tiny", "blip-tiny")}


def _for_clip_benchmark(path: str):
    """vlp's model, its image transform, its tokenizer, and that tokenizer called as
    CLIP_benchmark calls one (a list of texts -> a tensor of ids)."""
    import vlp

    model, tokenizer = vlp.load(path), vlp.load_tokenizer(path)
    context = model.config.text.context_length
    return model.eval(), vlp.image_transform(model), tokenizer, lambda texts: tokenizer(
        list(texts), context_length=context)


def _topk_accuracy(logits, target, topk=(1,)):
    """Share of rows whose target is among the k highest logits. CLIP_benchmark 1.6.2's own
    `accuracy` calls float() on a one-element array, which NumPy 2.4 refuses; this stands in
    for it, and the rest of its `evaluate` runs as released."""
    best = logits.topk(max(topk), dim=1).indices
    return [int((best[:, :k] == target[:, None]).any(dim=1).sum()) / len(target) for k in topk]


def test_zeroshot_equals_clip_benchmark(data, model_dir, tmp_path, monkeypatch, bench):
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as cb

    from vlp.eval.zeroshot import zero_shot_classifier

    monkeypatch.setattr(cb, "accuracy", _topk_accuracy)

    ours = bench(model_dir["clip-tiny"], "--task", "zeroshot", "--format", "imagenet",
                  "--root", data["root"] / "in")
    templates = ours["protocol"]["templates"]
    assert ours["num_items"] == N_TEST and ours["num_classes"] == len(data["classnames"]) >= 5

    model, transform, tokenizer, tokenize = _for_clip_benchmark(model_dir["clip-tiny"])
    # CLIP_benchmark's own ImageNet-layout reader (root/val, one folder per wnid), with the
    # class names and the templates ('{c}' for the class) from its custom files
    (tmp_path / "classnames.json").write_text(json.dumps(
        {"imagenet1k-unverified": data["classnames"]}))
    (tmp_path / "templates.json").write_text(json.dumps(
        {"imagenet1k-unverified": [t.replace("{}", "{c}") for t in templates]}))
    dataset = build_dataset("imagenet1k-unverified", root=str(data["root"] / "in"),
                            transform=transform, split="test", download=False,
                            custom_classname_file=str(tmp_path / "classnames.json"),
                            custom_template_file=str(tmp_path / "templates.json"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)
    theirs = cb.evaluate(model, loader, tokenize, dataset.classes, dataset.templates, "cpu",
                         amp=False)
    assert ours["zeroshot_top1"] == pytest.approx(theirs["acc1"], abs=1e-12)
    assert ours["zeroshot_top5"] == pytest.approx(theirs["acc5"], abs=1e-12)
    assert ours["zeroshot_mean_per_class_top1"] == pytest.approx(
        theirs["mean_per_class_recall"], abs=1e-12)
    assert 0 < ours["zeroshot_top5"] < 1  # neither metric is at a bound both would share
    # the classifier itself (prompt ensemble: mean of normalised embeddings, renormalised)
    weights = cb.zero_shot_classifier(model, tokenize, dataset.classes, dataset.templates,
                                      "cpu", amp=False)
    ours_weights = zero_shot_classifier(model, tokenizer, data["classnames"], templates,
                                        progress=False)
    torch.testing.assert_close(ours_weights, weights.float(), atol=1e-5, rtol=1e-5)


def test_retrieval_equals_clip_benchmark(data, model_dir, tmp_path, bench):
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval as cb

    coco = data["root"] / "coco"
    ours = bench(model_dir["clip-tiny"], "--task", "retrieval", "--format",
                  "coco-karpathy", "--root", coco)
    assert ours["num_items"] == N_TEST and ours["num_texts"] == 5 * N_TEST
    # CLIP_benchmark reads COCO's Karpathy test split as a COCO captions file over val2014/
    karpathy = json.loads((coco / "dataset_coco.json").read_text())["images"]
    annotation = tmp_path / "coco_test_karpathy.json"
    annotation.write_text(json.dumps({
        "images": [{"id": im["cocoid"], "file_name": im["filename"]} for im in karpathy],
        "annotations": [{"image_id": im["cocoid"], "id": 10 * im["cocoid"] + j,
                         "caption": s["raw"]}
                        for im in karpathy for j, s in enumerate(im["sentences"])]}))
    model, transform, tokenizer, tokenize = _for_clip_benchmark(model_dir["clip-tiny"])
    dataset = build_dataset("mscoco_captions", root=str(coco), transform=transform,
                            split="test", download=False, annotation_file=str(annotation),
                            task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False,
                                         collate_fn=get_dataset_collate_fn("mscoco_captions"))
    theirs = cb.evaluate(model, loader, tokenize, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):  # CLIP_benchmark: "text retrieval" = image query -> texts
        assert ours[f"i2t_r{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"],
                                                  abs=1e-6), k
        assert ours[f"t2i_r{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"],
                                                  abs=1e-6), k
    assert 0 < ours["t2i_r10"] < 1 and 0 < ours["i2t_r10"] < 1


def test_captioning_equals_pycocoevalcap_on_the_server_file(data, model_dir, tmp_path, bench):
    """The COCO caption evaluation as its users run it: the references as a COCO annotation
    file, vlp's server result file read with loadRes, both tokenised by PTBTokenizer and scored
    by pycocoevalcap's scorers (COCOEvalCap.evaluate's steps, less SPICE, whose Stanford
    CoreNLP models it would download)."""
    from vlp.eval.captioning import pycocoevalcap_available

    if not pycocoevalcap_available():
        pytest.skip("pycocoevalcap / java not installed")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    coco = data["root"] / "coco"
    ours = bench(model_dir["blip-tiny"], "--task", "captioning", "--format",
                  "coco-karpathy", "--root", coco, "--num-beams", "1", "--max-new-tokens", "8",
                  "--caption-backend", "pycocoevalcap", "--out", tmp_path)
    assert ours["protocol"]["caption_backend"] == "pycocoevalcap"
    karpathy = json.loads((coco / "dataset_coco.json").read_text())["images"]
    annotation = tmp_path / "captions_karpathy_test.json"
    annotation.write_text(json.dumps({
        "info": {}, "licenses": [], "type": "captions",
        "images": [{"id": im["cocoid"], "file_name": im["filename"]} for im in karpathy],
        "annotations": [{"image_id": im["cocoid"], "id": 10 * im["cocoid"] + j,
                         "caption": s["raw"]}
                        for im in karpathy for j, s in enumerate(im["sentences"])]}))
    references = COCO(str(annotation))
    results = references.loadRes(ours["result_file"])
    ids = results.getImgIds()
    assert len(ids) == ours["num_items"] == N_TEST
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: references.imgToAnns[i] for i in ids})
    res = tokenizer.tokenize({i: results.imgToAnns[i] for i in ids})
    theirs = {}
    for scorer, names in ((Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
                          (Meteor(), "METEOR"), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")):
        score, _ = scorer.compute_score(gts, res)
        theirs.update(zip(names, score) if isinstance(names, list) else [(names, score)])
    for key, name in (("bleu_4", "Bleu_4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE_L"),
                      ("cider", "CIDEr")):
        assert ours[key] == pytest.approx(theirs[name], abs=1e-6), key
    assert ours["bleu_1"] == pytest.approx(theirs["Bleu_1"], abs=1e-6)
