"""The loader: skips, sharding, seeded shuffling and augmentation, exact resume."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp.data import (
    CsvSource,
    ImageFolderSource,
    ImageTransform,
    WebDatasetSource,
    make_loader,
)
from vlp.errors import DataError

HALF = (0.5, 0.5, 0.5)
TRAIN = ImageTransform(8, HALF, HALF, train=True)
EVAL = ImageTransform(8, HALF, HALF, train=False)


class CharTokenizer:
    """Test helper: bos, one id per character, eos, right-padded to `context_length`."""

    context_length = 12

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            row = [1, *[3 + ord(c) % 200 for c in text][: self.context_length - 2], 2]
            rows.append(row + [0] * (self.context_length - len(row)))
        return torch.tensor(rows, dtype=torch.long)


def image_bytes(i: int, size: int = 16, fmt: str = "PNG") -> bytes:
    """A small image that differs per i and is not uniform, so crops differ."""
    image = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, 128))
    image.paste((255, 255, 255), (0, 0, size // 2, size // 3))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def caption(i: int) -> str:
    return f"thing {i}"


def write_csv(root: Path, n: int, extra_rows: tuple[str, ...] = ()) -> CsvSource:
    (root / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(image_bytes(i))
        rows.append(f"img/{i}.png,{caption(i)}")
    (root / "data.csv").write_text("filepath,caption\n" + "\n".join([*rows, *extra_rows]) + "\n")
    return CsvSource(root / "data.csv")


CORRUPT_JPEG = b"\xff\xd8 definitely not a jpeg"


def write_shards(root: Path, sizes: list[int], corrupt: tuple[int, ...] = ()
                 ) -> WebDatasetSource:
    """Shards of samples keyed 0, 1, ...; the keys in `corrupt` get an undecodable .jpg."""
    key = 0
    for shard, size in enumerate(sizes):
        with tarfile.open(root / f"shard-{shard:06d}.tar", "w") as tar:
            for _ in range(size):
                image = {"jpg": CORRUPT_JPEG} if key in corrupt else {"png": image_bytes(key)}
                members = {**image, "txt": caption(key).encode(),
                           "json": json.dumps({"key": f"{key:09d}"}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                key += 1
    return WebDatasetSource(str(root / f"shard-{{000000..{len(sizes) - 1:06d}}}.tar"))


def loader_for(source, **options):
    settings = {"transform": TRAIN, "tokenizer": CharTokenizer(), "batch_size": 4,
                "train": True, "seed": 7}
    return make_loader(source, **{**settings, **options})


def run_epochs(loader, epochs: int) -> list[dict]:
    batches = []
    for _ in range(epochs):
        batches.extend(loader)
    return batches


def assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["pixels"], b["pixels"])  # bitwise, augmentation included
        assert torch.equal(a["input_ids"], b["input_ids"])


@pytest.fixture(scope="module")
def csv_source(tmp_path_factory: pytest.TempPathFactory) -> CsvSource:
    return write_csv(tmp_path_factory.mktemp("csv"), 22)


@pytest.fixture(scope="module")
def wds_source(tmp_path_factory: pytest.TempPathFactory) -> WebDatasetSource:
    return write_shards(tmp_path_factory.mktemp("wds"), [7, 5, 6, 4])


# -- batches, tokens, skips --------------------------------------------------------------


def test_eval_batches_cover_the_source_in_order_with_tokens(csv_source: CsvSource) -> None:
    loader = loader_for(csv_source, train=False, transform=EVAL, batch_size=5)
    batches = list(loader)
    assert len(loader) == len(batches) == 5  # 22 samples, last batch of 2 kept
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(22))
    first = batches[0]
    assert first["pixels"].shape == (5, 3, 8, 8) and first["num_skipped"] == 0
    assert torch.equal(first["input_ids"], CharTokenizer()([caption(i) for i in range(5)]))
    assert "labels" not in first and loader.skipped_report() == {}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path: Path, num_workers: int) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    source = write_csv(tmp_path, 6, extra_rows=(
        "img/corrupt.jpg,a corrupt image", "img/missing.jpg,a missing image", "img/0.png,",
        "img/1.png,   "))
    loader = loader_for(source, train=False, transform=EVAL, batch_size=5,
                        num_workers=num_workers)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3, 4], [5]]
    assert [b["num_skipped"] for b in batches] == [0, 4]
    assert loader.skipped_report() == {"corrupt_image": 1, "missing_caption": 2,
                                       "missing_image": 1}
    image = lambda name: tmp_path / "img" / name
    listed = [f"{image('corrupt.jpg')}: corrupt_image", f"{image('missing.jpg')}: missing_image",
              f"{image('0.png')}: missing_caption", f"{image('1.png')}: missing_caption"]
    assert loader.skipped_items() == listed
    assert all(b["input_ids"].shape[0] == b["pixels"].shape[0] for b in batches)
    list(loader)  # a new epoch starts its own count
    assert sum(loader.skipped_report().values()) == 4 and loader.skipped_items() == listed


def test_a_batch_of_only_bad_samples_does_not_crash(tmp_path: Path) -> None:
    source = write_csv(tmp_path, 2, extra_rows=("img/gone.png,x", "img/gone2.png,y"))
    dropped = list(loader_for(source, train=False, transform=EVAL, batch_size=2))
    assert [b["index"].tolist() for b in dropped] == [[0, 1]]
    kept = list(loader_for(source, train=False, transform=EVAL, batch_size=2,
                           keep_empty_batches=True))
    empty = kept[1]
    assert empty["pixels"].shape == (0, 3, 8, 8) and empty["input_ids"].shape == (0, 12)
    assert empty["index"].numel() == 0 and empty["num_skipped"] == 2


def test_image_folder_batches_carry_labels_and_no_text(tmp_path: Path) -> None:
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.png").write_bytes(image_bytes(i + label))
    loader = make_loader(ImageFolderSource(tmp_path), transform=EVAL, tokenizer=None,
                         batch_size=4, train=False)
    labels = torch.cat([b["labels"] for b in loader]).tolist()
    assert labels == [0, 0, 0, 1, 1, 1]
    assert all("input_ids" not in b and "texts" not in b for b in loader)


def test_without_tokenizer_batches_carry_raw_texts(csv_source: CsvSource) -> None:
    batch = next(iter(make_loader(csv_source, transform=EVAL, tokenizer=None, batch_size=3,
                                  train=False)))
    assert batch["texts"] == [caption(i) for i in range(3)] and "input_ids" not in batch


def test_real_bpe_tokenizer_runs_in_workers(csv_source: CsvSource) -> None:
    from vlp.tokenizers import train_tokenizer

    tokenizer = train_tokenizer([caption(i) for i in range(22)], vocab_size=280,
                                context_length=10)
    loader = make_loader(csv_source, transform=EVAL, tokenizer=tokenizer, batch_size=11,
                         train=False, num_workers=2)
    ids = torch.cat([b["input_ids"] for b in loader])
    assert torch.equal(ids, tokenizer([caption(i) for i in range(22)]))


# -- shuffling, augmentation, sharding ----------------------------------------------------


def epoch_order(loader) -> list[int]:
    return torch.cat([b["index"] for b in loader]).tolist()


def test_shuffle_depends_only_on_seed_and_epoch(csv_source: CsvSource) -> None:
    loader = loader_for(csv_source)
    first, second = epoch_order(loader), epoch_order(loader)  # iterating again: next epoch
    assert loader.epoch == 1 and len(first) == 20  # drop_last in training: 5 full batches
    assert len(set(first)) == 20 and first != second and first != sorted(first)
    same = loader_for(csv_source)
    assert epoch_order(same) == first
    same.set_epoch(1)
    assert epoch_order(same) == second
    assert epoch_order(loader_for(csv_source, seed=8)) != first


def test_augmentation_does_not_depend_on_worker_count(csv_source: CsvSource) -> None:
    serial = list(loader_for(csv_source, num_workers=0))
    parallel = list(loader_for(csv_source, num_workers=2))
    assert_same_batches(serial, parallel)
    # the same sample gets a different crop in another epoch
    loader = loader_for(csv_source)
    epochs = [{i: p for b in loader for i, p in zip(b["index"].tolist(), b["pixels"])}
              for _ in range(2)]
    assert not torch.equal(epochs[0][3], epochs[1][3])


@pytest.mark.parametrize("drop_last", [False, True])
def test_map_ranks_get_equal_disjoint_covering_shares(csv_source: CsvSource,
                                                      drop_last: bool) -> None:
    loaders = [loader_for(csv_source, rank=r, world_size=3, drop_last=drop_last, batch_size=2)
               for r in range(3)]
    shares = [epoch_order(loader) for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1
    assert [len(s) for s in shares] == ([8, 8, 8] if not drop_last else [6, 6, 6])
    everything = [i for share in shares for i in share]
    if drop_last:  # 22 // 3 = 7 per rank, 3 full batches of 2: disjoint
        assert len(set(everything)) == len(everything) == 18
    else:  # padded to 24 by repeating the start of the permutation: covers all 22
        assert set(everything) == set(range(22))
        assert len(everything) - len(set(everything)) == 2


def test_rng_state_of_the_trainer_is_untouched(csv_source: CsvSource) -> None:
    state = torch.get_rng_state()
    list(loader_for(csv_source, num_workers=2))
    assert torch.equal(state, torch.get_rng_state())


# -- exact resume -------------------------------------------------------------------------


def resume_matches(make, epochs: int, stop_after: list[int]) -> None:
    """Resuming from each point in `stop_after` (batches into the run) matches a full run."""
    full = run_epochs(make(), epochs)
    for stop in stop_after:
        loader = make()
        head = []
        while len(head) < stop:
            for batch in loader:
                head.append(batch)
                if len(head) == stop:
                    break
        state = json.loads(json.dumps(loader.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        tail = []
        while len(head) + len(tail) < len(full):
            tail.extend(resumed)
        assert_same_batches(head + tail, full)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_map_resume_is_exact(csv_source: CsvSource, num_workers: int) -> None:
    make = lambda: loader_for(csv_source, num_workers=num_workers)  # 5 batches / epoch
    resume_matches(make, epochs=2, stop_after=[3, 5, 7])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_resume_is_exact(wds_source: WebDatasetSource, num_workers: int) -> None:
    make = lambda: loader_for(wds_source, num_workers=num_workers, shuffle_buffer=5)
    assert len(make()) == 5  # 22 samples // 4
    resume_matches(make, epochs=2, stop_after=[2, 5, 8])


def test_resume_state_records_skips_and_rejects_other_settings(tmp_path: Path) -> None:
    source = write_csv(tmp_path, 6, extra_rows=("img/gone.png,x",))
    loader = loader_for(source, train=False, transform=EVAL, batch_size=3)
    for _ in loader:
        pass
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 3
    assert state["skipped"] == {"missing_image": 1}
    assert state["skipped_items"] == [f"{tmp_path / 'img' / 'gone.png'}: missing_image"]
    with pytest.raises(DataError, match="batch_size"):
        loader_for(source, train=False, transform=EVAL, batch_size=2).load_state_dict(state)


def test_set_epoch_after_load_keeps_the_resume_point(csv_source: CsvSource) -> None:
    loader = loader_for(csv_source)
    loader.set_epoch(3)
    expected = list(loader)[2:]
    resumed = loader_for(csv_source)
    resumed.load_state_dict({"epoch": 3, "batches_done": 2})
    resumed.set_epoch(3)  # a trainer's per-epoch call must not lose the position
    assert_same_batches(list(resumed), expected)


# -- WebDataset sharding ------------------------------------------------------------------


def test_webdataset_ranks_run_the_same_number_of_batches(wds_source: WebDatasetSource) -> None:
    loaders = [loader_for(wds_source, rank=r, world_size=3, num_workers=2, shuffle_buffer=3)
               for r in range(3)]
    counts = [len(list(loader)) for loader in loaders]
    assert counts == [len(loaders[0])] * 3 == [1, 1, 1]  # 22 // 3 = 7 per rank -> 1 batch
    # more ranks x workers than shards: shards are split, still one equal share each
    many = [loader_for(wds_source, rank=r, world_size=4, num_workers=2, batch_size=2)
            for r in range(4)]
    assert [len(list(loader)) for loader in many] == [2, 2, 2, 2]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_eval_reads_each_sample_once(wds_source: WebDatasetSource,
                                                num_workers: int) -> None:
    indices = []
    for rank in range(2):
        loader = loader_for(wds_source, train=False, transform=EVAL, rank=rank, world_size=2,
                            num_workers=num_workers)
        batches = list(loader)
        assert len(batches) == len(loader)
        indices += torch.cat([b["index"] for b in batches]).tolist()
    positions = sorted((i >> 32, i & 0xFFFFFFFF) for i in indices)
    sizes = [7, 5, 6, 4]
    assert positions == [(s, p) for s, size in enumerate(sizes) for p in range(size)]


def test_webdataset_batches_hold_the_right_captions(wds_source: WebDatasetSource) -> None:
    offsets = [0, 7, 12, 18]  # first key of each shard
    for batch in loader_for(wds_source, num_workers=0):
        keys = [offsets[i >> 32] + (i & 0xFFFFFFFF) for i in batch["index"].tolist()]
        assert torch.equal(batch["input_ids"], CharTokenizer()([caption(k) for k in keys]))


# -- damaged WebDataset shards --------------------------------------------------------------


def write_damaged_shards(root: Path, sizes: list[int], corrupt: tuple[int, ...],
                         cut_shard: int, cut_position: int) -> tuple[WebDatasetSource, str]:
    """Shards with img2dataset stats, one cut inside the image of sample `cut_position`.

    Returns the source and the listing entry the cut should get.
    """
    source = write_shards(root, sizes, corrupt)
    for shard, size in enumerate(sizes):
        (root / f"shard-{shard:06d}_stats.json").write_text(json.dumps({"successes": size}))
    path = Path(source.shards[cut_shard])
    with tarfile.open(path) as tar:
        image = tar.getmembers()[3 * cut_position]
    path.write_bytes(path.read_bytes()[:image.offset_data + image.size // 2])
    lost = sizes[cut_shard] - cut_position
    return source, f"{path}: truncated_shard ({lost} samples after byte {image.offset})"


def shard_of(sizes: list[int], key: int) -> tuple[int, int]:
    """(shard, position) of a sample key of `write_shards`."""
    for shard, size in enumerate(sizes):
        if key < size:
            return shard, key
        key -= size
    raise ValueError(key)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_over_damaged_shards_skips_counts_and_lists_the_damage(
        tmp_path: Path, num_workers: int) -> None:
    sizes, corrupt = [6, 5, 6], (2, 7, 13)
    source, cut_entry = write_damaged_shards(tmp_path, sizes, corrupt, cut_shard=1,
                                             cut_position=3)
    loader = loader_for(source, train=False, transform=EVAL, num_workers=num_workers)
    assert source.num_samples == 17  # lost samples stay in the count: the epoch size is fixed
    batches = list(loader)
    seen = [(i >> 32, i & 0xFFFFFFFF) for b in batches for i in b["index"].tolist()]
    lost = [(1, 3), (1, 4)]
    bad = [shard_of(sizes, key) for key in corrupt]
    good = [(s, p) for s, size in enumerate(sizes) for p in range(size)
            if (s, p) not in lost + bad]
    assert sorted(seen) == good  # every good sample exactly once
    assert loader.skipped_report() == {"corrupt_image": 3, "truncated_shard": 2}
    corrupt_entries = [f"{source.shards[s]}#{key:09d}: corrupt_image"
                       for key, (s, _) in zip(corrupt, bad)]
    assert sorted(loader.skipped_items()) == sorted([*corrupt_entries, cut_entry])
    list(loader)  # the next epoch lists its own skips
    assert sorted(loader.skipped_items()) == sorted([*corrupt_entries, cut_entry])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_over_damaged_shards_keeps_batches_counts_and_items(
        tmp_path: Path, num_workers: int) -> None:
    source, cut_entry = write_damaged_shards(tmp_path, [6, 5, 5], (1, 12), cut_shard=1,
                                             cut_position=2)
    make = lambda: loader_for(source, num_workers=num_workers, shuffle_buffer=5)
    full = make()
    whole = list(full)
    report, items = full.skipped_report(), full.skipped_items()
    assert len(full) == 4 and cut_entry in items
    if num_workers == 0:  # one stream reads every sample once: the skips are the damage
        assert report == {"corrupt_image": 2, "truncated_shard": 3} and len(items) == 3
    for stop in (1, 3):
        head_loader = make()
        head = list(itertools.islice(head_loader, stop))
        state = json.loads(json.dumps(head_loader.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        assert_same_batches(head + list(resumed), whole)
        assert resumed.skipped_report() == report and resumed.skipped_items() == items


@pytest.mark.timeout(60)
def test_a_non_tar_shard_fails_at_counting_and_is_skipped_when_met_mid_run(
        tmp_path: Path) -> None:
    source = write_shards(tmp_path, [4, 4])
    junk = Path(source.shards[1])
    junk.write_bytes(b"<html>404 not found</html>" * 40)
    with pytest.raises(DataError, match=f"{junk}: not a readable uncompressed tar"):
        loader_for(source, train=False, transform=EVAL)
    for shard in range(2):  # counts from img2dataset stats: the shards are not scanned up front
        (tmp_path / f"shard-{shard:06d}_stats.json").write_text(json.dumps({"successes": 4}))
    source = WebDatasetSource(source.shards)
    loader = loader_for(source, train=False, transform=EVAL)
    assert torch.cat([b["index"] for b in loader]).tolist() == [0, 1, 2, 3]
    assert loader.skipped_report() == {"truncated_shard": 4}
    assert loader.skipped_items() == [f"{junk}: truncated_shard (4 samples after byte 0)"]


def test_skipped_items_are_bounded_per_epoch(tmp_path: Path) -> None:
    source = write_csv(tmp_path, 4, extra_rows=tuple(f"img/gone{i}.png,x" for i in range(120)))
    loader = loader_for(source, train=False, transform=EVAL, batch_size=64)
    assert torch.cat([b["index"] for b in loader]).tolist() == [0, 1, 2, 3]
    assert loader.skipped_report() == {"missing_image": 120}
    items = loader.skipped_items()
    assert len(items) == 100 and items[0] == f"{tmp_path / 'img' / 'gone0.png'}: missing_image"


def test_too_few_samples_for_a_batch_is_an_error(csv_source: CsvSource) -> None:
    with pytest.raises(DataError, match="too few samples"):
        loader_for(csv_source, batch_size=50)
