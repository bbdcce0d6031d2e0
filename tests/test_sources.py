"""Sources over real on-disk files: CSV/TSV, JSONL, COCO, image folder, WebDataset tars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp.data import (
    CocoSource,
    CsvSource,
    ImageFolderSource,
    ImageTransform,
    JsonlSource,
    ListSource,
    WebDatasetSource,
    build_source,
    expand_braces,
    expand_urls,
    infer_source_kind,
    make_loader,
)
from vlp.data.webdataset import scan_shard, stream_shard
from vlp.errors import ConfigError, DataError


def png_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    """img2dataset layout: {key}.png + {key}.txt and/or {key}.json per sample."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            members = {"png": sample.get("image")}
            if "txt" in sample:
                members["txt"] = sample["txt"].encode()
            if "json" in sample:
                members["json"] = json.dumps(sample["json"]).encode()
            for ext, data in members.items():
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{sample['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


# -- CSV / TSV ------------------------------------------------------------------------------


def test_csv_resolves_relative_and_absolute_paths(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere.png"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "captions.csv").write_text(
        f'filepath,caption\nimages/a.png,"a red, round thing"\n{absolute},second\n'
    )
    source = CsvSource(tmp_path / "data" / "captions.csv")
    assert len(source) == 2 and source.has_text and not source.has_labels
    assert source[0].image == str(tmp_path / "data" / "images" / "a.png")
    assert source[0].text == "a red, round thing"  # quoted separator stays in the caption
    assert source[1].image == str(absolute)
    assert [r.key for r in source] == ["0", "1"]


def test_tsv_by_suffix_with_custom_columns_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("title\timg\tlabel\nfirst, with comma\tx.png\t3\nsecond\ty.png\t0\n")
    source = CsvSource(path, image_key="img", caption_key="title", label_key="label")
    assert [(r.text, Path(r.image).name, r.label) for r in source] == [
        ("first, with comma", "x.png", 3), ("second", "y.png", 0)]
    assert source.has_labels


def test_csv_missing_column_names_file_column_and_present_columns(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("image,text\na.png,hello\n")
    with pytest.raises(DataError) as info:
        CsvSource(path)
    message = str(info.value)
    assert str(path) in message and "'filepath'" in message
    assert "image" in message and "text" in message  # the columns present
    with pytest.raises(DataError, match="'caption'"):
        CsvSource(path, image_key="image")
    assert CsvSource(path, image_key="image", caption_key="text")[0].text == "hello"


def test_csv_errors_on_missing_file_and_bad_label(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        CsvSource(tmp_path / "nope.csv")
    path = tmp_path / "labels.csv"
    path.write_text("filepath,caption,label\na.png,x,cat\n")
    with pytest.raises(DataError, match=r"labels\.csv:2.*'cat'"):
        CsvSource(path, label_key="label")


def test_csv_groups_rows_by_image(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("filepath,caption\na.png,a one\nb.png,b one\na.png,a two\nc.png,\n")
    groups = CsvSource(path).groups()
    assert [Path(p).name for p in groups.images] == ["a.png", "b.png"]  # c.png has no caption
    assert groups.texts == ["a one", "b one", "a two"]
    assert groups.text_to_image == [0, 1, 0]
    assert groups.image_to_texts == [[0, 2], [1]]


# -- JSONL --------------------------------------------------------------------------------


def test_jsonl_records_and_caption_lists(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"image": "i/0.png", "caption": "zero"}, {"image": "i/1.png", "caption": ["a", "b"]},
            {"image": "/abs/2.png", "caption": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    source = JsonlSource(path)
    assert [r.text for r in source] == ["zero", "a", "b", None]
    assert source[0].image == str(tmp_path / "i" / "0.png")
    assert source[3].image == "/abs/2.png"
    assert source.groups().text_to_image == [0, 1, 1]


def test_jsonl_bad_line_and_missing_key_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "caption": "ok"}\n{"image": "b.png", caption}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        JsonlSource(path)
    path.write_text('{"image": "a.png", "caption": "ok"}\n{"img": "b.png", "caption": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no key 'image'.*'img'"):
        JsonlSource(path)



def test_a_row_without_caption_is_skipped_and_counted_in_jsonl_as_in_csv(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "d.jsonl").write_text('{"image": "0.png", "caption": "zero"}\n'
                                      '{"image": "1.png"}\n{"image": "2.png", "caption": "two"}\n')
    (tmp_path / "d.csv").write_text("filepath,caption\n0.png,zero\n1.png\n2.png,two\n")
    for source in (JsonlSource(tmp_path / "d.jsonl"), CsvSource(tmp_path / "d.csv")):
        loader = make_loader(source, transform=ImageTransform(8, (0.5,) * 3, (0.5,) * 3,
                                                              train=False),
                             tokenizer=lambda texts: torch.ones(len(texts), 4, dtype=torch.long),
                             batch_size=3, train=False)
        assert torch.cat([b["index"] for b in loader]).tolist() == [0, 2]
        assert loader.skipped_report() == {"missing_caption": 1}, source
    (tmp_path / "none.jsonl").write_text('{"image": "0.png", "text": "zero"}\n')
    with pytest.raises(DataError, match=r"none\.jsonl: no row has key 'caption' \(caption_key\); "
                                        r"keys present: \['image', 'text'\]"):
        JsonlSource(tmp_path / "none.jsonl")


# -- COCO ---------------------------------------------------------------------------------


def test_coco_one_record_per_caption_and_groups(tmp_path: Path) -> None:
    coco = {
        "images": [{"id": 7, "file_name": "b.png", "width": 16, "height": 16},
                   {"id": 3, "file_name": "a.png", "width": 16, "height": 16}],
        "annotations": [{"id": 10, "image_id": 3, "caption": "a first"},
                        {"id": 11, "image_id": 7, "caption": "b first"},
                        {"id": 12, "image_id": 3, "caption": "a second"}],
    }
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps(coco))
    source = CocoSource(path, image_root=tmp_path / "imgs")
    assert len(source) == 3
    assert source[0].image == str(tmp_path / "imgs" / "a.png") and source[0].key == "10"
    groups = source.groups()
    # images keep the JSON's order; captions keep annotation order
    assert [Path(p).name for p in groups.images] == ["b.png", "a.png"]
    assert groups.texts == ["a first", "b first", "a second"]
    assert groups.text_to_image == [1, 0, 1]


def test_coco_unknown_image_id_and_bad_layout(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(DataError, match="image_id 1"):
        CocoSource(path)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="'images'"):
        CocoSource(path)


# -- image folder -------------------------------------------------------------------------


def test_image_folder_classes_labels_and_names(tmp_path: Path) -> None:
    for class_dir, names in {"red_circle": ["1.png", "0.jpg"], "blue_square": ["a.PNG"],
                             "green_star": []}.items():
        (tmp_path / class_dir).mkdir()
        for name in names:
            (tmp_path / class_dir / name).write_bytes(png_bytes((1, 2, 3)))
    (tmp_path / "red_circle" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class directories \['green_star'\] hold no images"):
        ImageFolderSource(tmp_path)  # an empty folder is no class to score
    (tmp_path / "green_star" / "s.png").write_bytes(png_bytes((1, 2, 3)))
    source = ImageFolderSource(tmp_path)
    assert source.classes == ["blue_square", "green_star", "red_circle"]
    assert source.classnames == ["blue square", "green star", "red circle"]
    assert [(r.key, r.label) for r in source] == [
        ("blue_square/a.PNG", 0), ("green_star/s.png", 1), ("red_circle/0.jpg", 2),
        ("red_circle/1.png", 2)]
    (tmp_path / "green_star" / "s.png").unlink()
    assert not source.has_text and source.has_labels
    fixed = ImageFolderSource(tmp_path, classes=["red_circle", "yellow_moon", "blue_square",
                                                 "green_star"])
    assert [r.label for r in fixed] == [0, 0, 2] and fixed.classnames[1] == "yellow moon"
    with pytest.raises(DataError, match="green_star"):
        ImageFolderSource(tmp_path, classes=["red_circle", "blue_square"])


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        ImageFolderSource(tmp_path / "missing")
    with pytest.raises(DataError, match="no class directories"):
        ImageFolderSource(tmp_path)


# -- WebDataset ---------------------------------------------------------------------------


def test_expand_braces_ranges_padding_and_alternatives() -> None:
    assert expand_braces("s-{000008..000010}.tar") == [
        "s-000008.tar", "s-000009.tar", "s-000010.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_expand_urls_pattern_list_directory_and_missing(tmp_path: Path) -> None:
    for k in range(3):
        write_shard(tmp_path / f"shard-{k:06d}.tar", [])
    names = [str(tmp_path / f"shard-{k:06d}.tar") for k in range(3)]
    assert expand_urls(str(tmp_path / "shard-{000000..000002}.tar")) == names
    assert expand_urls(tmp_path) == names
    assert expand_urls(names[::-1]) == names[::-1]
    with pytest.raises(DataError, match="shard-000003.tar"):
        expand_urls(str(tmp_path / "shard-{000000..000003}.tar"))


def test_webdataset_records_captions_from_txt_or_json(tmp_path: Path) -> None:
    write_shard(tmp_path / "0.tar", [
        {"key": "000000000", "image": png_bytes((255, 0, 0)), "txt": "from txt",
         "json": {"caption": "from json"}},
        {"key": "000000001", "image": png_bytes((0, 255, 0)), "json": {"caption": "only json"}},
    ])
    write_shard(tmp_path / "1.tar", [{"key": "000000002", "image": None, "txt": "no image"}])
    source = build_source("wds", str(tmp_path / "{0..1}.tar"))
    records = list(source)
    assert [r.key for r in records] == ["000000000", "000000001", "000000002"]
    assert [r.text for r in records] == ["from txt", "only json", "no image"]
    assert Image.open(io.BytesIO(records[1].image)).getpixel((3, 3)) == (0, 255, 0)
    assert records[2].image == b""
    assert source.shard_sizes == [2, 1] and source.num_samples == 3
    assert not source.num_samples_given


def test_webdataset_labels_and_given_sample_count(tmp_path: Path) -> None:
    write_shard(tmp_path / "0.tar", [
        {"key": "a", "image": png_bytes((0, 0, 0)), "json": {"caption": "x", "label": 4}}])
    source = WebDatasetSource(tmp_path, num_samples=1000, label_key="label")
    assert source.num_samples == 1000 and source.num_samples_given
    assert next(iter(source)).label == 4 and source.has_labels


def test_webdataset_stats_that_disagree_with_the_shard_are_refused(tmp_path: Path) -> None:
    write_shard(tmp_path / "00000.tar", [{"key": k, "image": png_bytes((0, 0, i)), "txt": "x"}
                                         for i, k in enumerate("ab")])
    stats = tmp_path / "00000_stats.json"
    stats.write_text(json.dumps({"successes": 2}))
    assert WebDatasetSource(tmp_path).num_samples == 2
    for wrong in (5, 1):  # an epoch of 5 (each sample repeated) or 1 (one never seen)
        stats.write_text(json.dumps({"successes": wrong}))
        with pytest.raises(DataError, match=f"^{stats}: says {wrong} samples .* holds 2; fix"):
            _ = WebDatasetSource(tmp_path).num_samples


def test_webdataset_duplicate_keys_are_skipped_and_named(tmp_path: Path) -> None:
    shard = tmp_path / "0.tar"
    write_shard(shard, [{"key": "a", "image": png_bytes((0, 0, 1)), "txt": "first"},
                        {"key": "a", "image": png_bytes((0, 0, 2)), "txt": "second"},
                        {"key": "b", "image": png_bytes((0, 0, 3)), "txt": "third"}])
    samples = list(scan_shard(str(shard)))
    assert [(s.key, s.lost, s.reason) for s in samples] == [
        ("a", False, "truncated_shard"), ("a", True, "duplicate_key"), ("b", False,
                                                                       "truncated_shard")]
    assert samples[1].note == f"{shard}#a: duplicate_key"
    url = f"pipe:cat {shard}"  # the stream reader groups the same way, in one pass
    streamed = list(stream_shard(url))
    assert [(s.key, s.lost, s.reason, s.members) for s in streamed] == [
        (s.key, s.lost, s.reason, s.members) for s in samples]
    assert streamed[1].note == f"{url}#a: duplicate_key"
    assert [s.reader()(*s.members["txt"]) for s in streamed] == [b"first", b"second", b"third"]
    source = WebDatasetSource(shard)
    assert source.num_samples == 3 and [r.text for r in source] == ["first", "third"]
    loader = make_loader(source, transform=ImageTransform(8, (0.5,) * 3, (0.5,) * 3, train=False),
                         tokenizer=lambda texts: torch.ones(len(texts), 4, dtype=torch.long),
                         batch_size=3, train=False)
    assert sum(len(b["index"]) for b in loader) == 2
    assert loader.skipped_report() == {"duplicate_key": 1}
    assert loader.skipped_items() == [f"{shard}#a: duplicate_key"]


def test_a_huge_brace_range_is_refused_before_expanding(tmp_path: Path) -> None:
    pattern = str(tmp_path / "shard-{000000..999999999}.tar")
    with pytest.raises(DataError, match=r"expands to more than 1,000,000 names"):
        WebDatasetSource(pattern)
    with pytest.raises(DataError, match=r"more than 1,000,000"):
        expand_braces("{0..999}-{0..999}-{0..9}")


def test_webdataset_rejects_a_non_tar_shard(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(DataError, match="junk.tar.*not a readable uncompressed tar"):
        _ = WebDatasetSource(tmp_path / "junk.tar").num_samples
    # the loader's workers read it as a shard damaged from its first byte instead
    lost = list(scan_shard(str(tmp_path / "junk.tar"), strict=False))
    assert [(s.lost, s.note) for s in lost] == [
        (True, f"{tmp_path / 'junk.tar'}: truncated_shard (unknown number of samples after "
               f"byte 0, counted as 1)")]


# -- truncated WebDataset shards ------------------------------------------------------------


def three_sample_shard(path: Path) -> list[tarfile.TarInfo]:
    """Samples a, b, c of png + txt members; returns the member headers in file order."""
    write_shard(path, [{"key": key, "image": png_bytes((i, 0, 0), size=24), "txt": f"{key}!"}
                       for i, key in enumerate("abc")])
    with tarfile.open(path) as tar:
        return tar.getmembers()


def complete_before(members: list[tarfile.TarInfo], cut: int) -> list[tuple[str, list[str]]]:
    """(key, extensions) a scan of the file cut at `cut` should yield as whole samples."""
    samples: dict[str, list[str]] = {}
    for member in members:
        key, ext = member.name.split(".")
        if cut < member.offset_data:  # cut inside this header: earlier members stand
            break
        if cut < member.offset_data + member.size:  # cut inside its data: its sample is lost
            samples.pop(key, None)
            break
        samples.setdefault(key, []).append(ext)
    return list(samples.items())


def cut_points(members: list[tarfile.TarInfo]) -> dict[str, int]:
    a_png, a_txt, b_png, b_txt, c_png, c_txt = members
    return {
        "empty file": 0,
        "inside the first header": 100,
        "inside the first image": a_png.offset_data + 10,
        "inside a header between samples": b_png.offset + 200,
        "inside a caption header": b_txt.offset + 1,
        "inside an image after two samples": c_png.offset_data + c_png.size - 1,
        "inside padding after the last member": c_txt.offset_data + c_txt.size,
        "before the end blocks": c_txt.offset_data + 512,
        "inside the first end block": c_txt.offset_data + 512 + 300,
    }


@pytest.mark.timeout(30)
def test_scan_shard_yields_the_whole_samples_before_any_cut(tmp_path: Path) -> None:
    full = tmp_path / "full.tar"
    members = three_sample_shard(full)
    data = full.read_bytes()
    assert [s.key for s in scan_shard(str(full))] == ["a", "b", "c"]  # whole: no placeholder
    cut_file = tmp_path / "cut.tar"
    for where, cut in cut_points(members).items():
        cut_file.write_bytes(data[:cut])
        samples = list(scan_shard(str(cut_file)))
        whole = [(s.key, sorted(s.members)) for s in samples if not s.lost]
        assert whole == [(k, sorted(exts)) for k, exts in complete_before(members, cut)], where
        lost = [s for s in samples if s.lost]
        assert len(lost) == 1 and lost[0].members == {}, where  # the lost rest, counted once
        assert lost[0].note.startswith(f"{cut_file}: truncated_shard ("), where
    # any cut before the end blocks: never an error, whole samples then one placeholder
    end_blocks = members[-1].offset_data + 512
    assert end_blocks < len(data)
    for cut in range(0, end_blocks, 97):
        cut_file.write_bytes(data[:cut])
        samples = list(scan_shard(str(cut_file)))
        assert [s.key for s in samples if not s.lost] == \
            [k for k, _ in complete_before(members, cut)], cut
        assert [s.lost for s in samples][-1] and sum(s.lost for s in samples) == 1, cut


def test_truncated_shard_placeholders_match_img2dataset_stats(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    members = three_sample_shard(shard)
    b_png = members[2]
    shard.write_bytes(shard.read_bytes()[:b_png.offset_data + 5])  # cut inside b's image
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 3}))
    samples = list(scan_shard(str(shard)))
    assert [(s.key, s.lost) for s in samples] == [("a", False), ("b", True), ("", True)]
    assert samples[1].note == f"{shard}: truncated_shard (2 samples after byte {b_png.offset})"
    assert samples[2].note == ""  # the damage is listed once
    source = WebDatasetSource(shard)
    assert source.shard_sizes == [3] and [r.key for r in source] == ["a"]


def test_truncated_shard_counts_its_placeholder_without_stats(tmp_path: Path) -> None:
    members = three_sample_shard(tmp_path / "0.tar")
    write_shard(tmp_path / "1.tar", [{"key": "d", "image": png_bytes((0, 0, 9)), "txt": "d"}])
    data = (tmp_path / "0.tar").read_bytes()
    (tmp_path / "0.tar").write_bytes(data[:members[4].offset_data + 3])  # inside c's image
    source = WebDatasetSource(tmp_path)
    assert source.shard_sizes == [3, 1] and source.num_samples == 4  # a, b, lost c; d
    assert [r.key for r in source] == ["a", "b", "d"]
    lost = [s for s in scan_shard(str(tmp_path / "0.tar")) if s.lost]
    assert [(s.key, s.note) for s in lost] == [
        ("c", f"{tmp_path / '0.tar'}: truncated_shard (unknown number of samples after byte "
              f"{members[4].offset}, counted as 1)")]


# -- build_source -------------------------------------------------------------------------


def test_build_source_kinds_options_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.tsv").write_text("filepath\tcaption\nx.png\thello\n")
    assert build_source("tsv", tmp_path / "a.tsv")[0].text == "hello"
    assert build_source("auto", tmp_path / "a.tsv")[0].text == "hello"
    (tmp_path / "b.csv").write_text("img,cap\nx.png,hi\n")
    assert build_source("csv", tmp_path / "b.csv", image_key="img", caption_key="cap")[0].text \
        == "hi"
    with pytest.raises(ConfigError, match="'parquet'"):
        build_source("parquet", tmp_path / "b.csv")
    with pytest.raises(ConfigError, match="'colour'"):
        build_source("csv", tmp_path / "b.csv", colour="red")
    assert infer_source_kind("x/shard-{0..3}.tar") == "wds"
    assert infer_source_kind("captions_val.json") == "coco"


def test_list_source_checks_lengths() -> None:
    source = ListSource(["a.png", "b.png"], texts=["a", None], labels=[0, 1])
    assert source[1].text is None and source[1].label == 1
    with pytest.raises(DataError, match="1 texts for 2 images"):
        ListSource(["a.png", "b.png"], texts=["a"])
