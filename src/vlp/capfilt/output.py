"""Stage 4: merge the filtered units into the bootstrapped dataset, beside its report.

``dataset/`` holds the kept pairs as ``train.csv`` and ``train.jsonl`` (what `vlp train`
reads), the same pairs as WebDataset shards ``wds/shard-*.tar`` (image, ``.txt`` caption,
``.json`` provenance), every caption kept or dropped with its provenance in
``provenance.jsonl``, and ``summary.json`` + ``report.html``. Images from shards are written
out under ``images/``; images from files are referred to by path. The stage rewrites all of it
from ``filtered/``, so it is cheap to repeat.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

from vlp.capfilt.config import CapfiltConfig
from vlp.capfilt.report import render_html, summarize
from vlp.capfilt.stages import FILTERED_DIR, read_unit, unit_path
from vlp.capfilt.units import WorkUnit, load_items
from vlp.errors import DataError
from vlp.store.files import atomic_write, atomic_write_text

DATASET_DIR = "dataset"
_TAR_MTIME = 946684800  # fixed member times: the same input writes byte-identical shards


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), _TAR_MTIME, 0o644
    tar.addfile(info, io.BytesIO(payload))


def _write_shard(path: Path, samples: list[tuple[str, str, bytes, dict[str, Any]]]) -> None:
    def write(temp: str) -> None:
        with tarfile.open(temp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, ext, image, meta in samples:
                _tar_member(tar, f"{key}.{ext}", image)
                _tar_member(tar, f"{key}.txt", meta["caption"].encode("utf-8"))
                _tar_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))

    atomic_write(path, write)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_bootstrapped(cfg: CapfiltConfig, units: list[WorkUnit],
                       settings: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/dataset`` from every unit's filter output; returns the summary (also in
    ``summary.json``), with ``files`` naming what was written."""
    missing = [u.name for u in units if not unit_path(cfg, FILTERED_DIR, u).is_file()]
    if missing:
        raise DataError(f"{cfg.out_dir / FILTERED_DIR}: no filter output for {len(missing)} of "
                        f"{len(units)} units (first {missing[0]}); run the filter stage first")
    out = cfg.out_dir / DATASET_DIR
    for stale in ("wds", "images"):
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "wds").mkdir(parents=True, exist_ok=True)
    all_rows: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []  # kept pairs
    provenance: list[dict[str, Any]] = []
    samples: list[tuple[str, str, bytes, dict[str, Any]]] = []
    shards: list[str] = []
    examples: list[tuple[dict[str, Any], str | bytes]] = []
    for unit in units:
        rows = read_unit(unit_path(cfg, FILTERED_DIR, unit))
        items = {item.key: item for item in load_items(cfg, unit)}
        for row in rows:
            item = items.get(row["key"])
            image_file = None
            if item is not None and isinstance(item.image, bytes):
                safe_key = re.sub(r"[^A-Za-z0-9_.-]", "_", item.key)
                image_file = f"images/{unit.name}/{safe_key}.{item.image_ext}"
                if any(c["kept"] for c in row["captions"]):
                    (out / image_file).parent.mkdir(parents=True, exist_ok=True)
                    (out / image_file).write_bytes(item.image)
            filepath = image_file or (item.image if item is not None else row["image"])
            for index, caption in enumerate(row["captions"]):
                meta = {"key": f"{row['key']}/{index}", "image": row["image"],
                        "caption": caption["text"], "source": caption["source"],
                        "itm": caption["itm"], "itc": caption["itc"], "kept": caption["kept"],
                        "noisy": caption["noisy"]}
                provenance.append(meta)
                if not caption["kept"]:
                    continue
                table.append({"filepath": filepath, **meta})
                if item is not None:
                    samples.append((f"{len(table) - 1:09d}", item.image_ext,
                                    _image_bytes(item.image), meta))
                if len(samples) == cfg.shard_size:
                    shards.append(_flush(out, len(shards), samples))
            if item is not None and len(examples) < cfg.report_examples \
                    and _worth_showing(row, examples, cfg.report_examples):
                examples.append((row, item.image))
        all_rows.extend(rows)
    if samples:
        shards.append(_flush(out, len(shards), samples))
    summary = summarize(all_rows)
    _write_tables(out, table, provenance)
    files = {"csv": "train.csv", "jsonl": "train.jsonl", "provenance": "provenance.jsonl",
             "wds": shards, "summary": "summary.json", "report": "report.html"}
    result = {**summary, "settings": settings, "files": files}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "report.html", render_html(summary, settings, examples))
    return result


def _worth_showing(row: dict[str, Any], examples: list, limit: int) -> bool:
    """Half the examples show a dropped caption (when there are such), the rest any item."""
    dropped = any(not c["kept"] for c in row["captions"])
    shown_dropped = sum(any(not c["kept"] for c in r["captions"]) for r, _ in examples)
    return dropped or len(examples) - shown_dropped < limit - limit // 2


def _image_bytes(image: str | bytes) -> bytes:
    if isinstance(image, bytes):
        return image
    try:
        return Path(image).read_bytes()
    except OSError:
        return b""


def _flush(out: Path, index: int, samples: list) -> str:
    name = f"wds/shard-{index:06d}.tar"
    _write_shard(out / name, list(samples))
    samples.clear()
    return name


def _write_tables(out: Path, table: list[dict[str, Any]],
                  provenance: list[dict[str, Any]]) -> None:
    def write_csv(temp: str) -> None:
        # RFC 4180 line ends: a caption holding \r or \n is then quoted (with "\n" alone, a
        # bare \r in a generated caption would split its row when read back)
        with open(temp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\r\n")
            writer.writerow(["filepath", "caption", "source", "itm"])
            writer.writerows([row["filepath"], row["caption"], row["source"], row["itm"]]
                             for row in table)

    atomic_write(out / "train.csv", write_csv)
    atomic_write_text(out / "train.jsonl", _jsonl(
        [{"image": row["filepath"], "caption": row["caption"], "source": row["source"],
          "itm": row["itm"], "itc": row["itc"], "key": row["key"]} for row in table]))
    atomic_write_text(out / "provenance.jsonl", _jsonl(provenance))


def dataset_csv(cfg: CapfiltConfig) -> str:
    path = cfg.out_dir / DATASET_DIR / "train.csv"
    if not path.is_file():
        raise DataError(f"{path}: no bootstrapped dataset; run the write stage first")
    return os.fspath(path)
