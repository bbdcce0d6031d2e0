"""`vlp embed --data SOURCE --out DIR`: a collection embedded part by part, resumable.

The output directory::

    embed.json                   what was embedded, how (model, source, part size, dtype), the parts
    img_emb/part-NNNNNN.npy      [rows, dim] L2-normalised embeddings (text_emb/ for texts)
    metadata/part-NNNNNN.parquet one row per embedding: id, path, key, caption, offset, size
    parts/part-NNNNNN.json       the part's count and its unreadable inputs (written last: done)
    summary.json                 every part's counts and unreadable inputs, once all are done

Every file is written atomically (`vlp.store.files.atomic_write`) and a part whose
``parts/*.json`` exists is skipped, so a killed run rerun with the same settings computes only
the missing parts and ends with the same bytes as an uninterrupted one. The ``local`` backend
runs the parts in this process (under ``torchrun``, rank r takes parts r, r + world, ...); the
``ray`` backend runs them on Ray Data actors, each holding the model. All call `PartWorker`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlp import factory
from vlp.errors import ConfigError, DataError, require_extra
from vlp.eval.embed import embed_images, embed_texts
from vlp.hub import is_pretrained_name, resolve
from vlp.search.parts import METADATA_COLUMNS, Part, SourceSpec, load_items, plan_parts
from vlp.store.files import atomic_write, atomic_write_text, read_json_object

FORMAT = "vlp-embeddings"
DTYPES = ("float32", "float16")
MANIFEST, SUMMARY = "embed.json", "summary.json"


@dataclass
class EmbedConfig:
    model: str
    out: str
    data: str
    modality: str = "image"  # "image" (a source of images) or "text" (a file, one per line)
    kind: str = "auto"
    options: dict[str, str] = field(default_factory=dict)  # image_key, image_root, ...
    part_size: int = 10_000
    batch_size: int = 256
    dtype: str = "float32"
    backend: str = "local"
    device: str = "cpu"
    num_workers: int = 0
    threads: int = 0  # torch threads per process or Ray actor (0: torch's default locally)
    ray_actors: int = 2
    ray_address: str | None = None
    progress: bool = True
    fast_decode: bool = False  # large JPEGs decode at a reduced scale (ImageTransform.draft_size)

    @property
    def spec(self) -> SourceSpec:
        return SourceSpec(self.data, self.modality, self.kind, tuple(sorted(self.options.items())))

    def check(self) -> EmbedConfig:
        if self.modality not in ("image", "text"):
            raise ConfigError(f"modality must be 'image' or 'text', got {self.modality!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"--backend must be 'local' or 'ray', got {self.backend!r}")
        for name in ("part_size", "batch_size", "ray_actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, "
                                  f"got {getattr(self, name)}")
        return self

    def model_name(self) -> str:
        """What embed.json records: a hub name as given, a directory as its absolute path."""
        return self.model if is_pretrained_name(self.model) else str(Path(self.model).resolve())


def emb_dir(modality: str) -> str:
    return "img_emb" if modality == "image" else "text_emb"


def part_files(out: Path, modality: str, name: str) -> tuple[Path, Path, Path]:
    """(embeddings .npy, metadata .parquet, done marker .json) of part ``name``."""
    return (out / emb_dir(modality) / f"{name}.npy", out / "metadata" / f"{name}.parquet",
            out / "parts" / f"{name}.json")


def _manifest(cfg: EmbedConfig, parts: list[Part]) -> dict[str, Any]:
    return {"format": FORMAT, "version": 1, "model": cfg.model_name(),
            "modality": cfg.modality,
            "source": {"data": str(Path(cfg.data).resolve()) if os.path.exists(cfg.data)
                       else cfg.data, "kind": cfg.spec.resolved_kind(),
                       "options": dict(sorted(cfg.options.items()))},
            "part_size": cfg.part_size, "dtype": cfg.dtype,
            # recorded only when on: directories written before the option resume as they were
            **({"fast_decode": True} if cfg.fast_decode and cfg.modality == "image" else {}),
            "parts": [part.describe() for part in parts]}


def _open_out(cfg: EmbedConfig, parts: list[Part]) -> Path:
    """The output directory with its embed.json; refuses one holding another run's parts."""
    out = Path(cfg.out)
    manifest = _manifest(cfg, parts)
    path = out / MANIFEST
    if path.is_file():
        found = read_json_object(path, DataError)
        if found != manifest:
            differ = sorted(k for k in set(manifest) | set(found)
                            if found.get(k) != manifest.get(k))
            raise ConfigError(f"{out}: holds embeddings made with other settings "
                              f"({', '.join(differ)} differ); use another --out or the same "
                              "settings to resume")
        return out
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: not empty and not a vlp embed output (no {MANIFEST})")
    for sub in (emb_dir(cfg.modality), "metadata", "parts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return out


class PartWorker:
    """Embeds parts with one loaded model; what both backends call."""

    def __init__(self, cfg: EmbedConfig) -> None:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.model, self.tokenizer, self.transform = factory.load_model_and_transforms(
            resolve(cfg.model), map_location=cfg.device, fast_decode=cfg.fast_decode)
        if cfg.modality == "text" and self.tokenizer is None:
            raise ConfigError(f"{cfg.model}: no tokenizer in the model directory; text "
                              "embeddings need one")
        self.model.require("embed", "vlp embed")

    def dim(self) -> int:
        if self.cfg.modality == "text":
            return int(embed_texts(self.model, self.tokenizer, ["x"], progress=False).shape[1])
        size = self.model.config.vision.image_size
        pixels = torch.zeros(1, 3, size, size)
        with torch.inference_mode():
            return int(self.model.encode_image(pixels.to(self._device())).shape[-1])

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def run(self, part: Part) -> int:
        """Embed ``part`` unless it is done; returns the rows written (-1: it was done)."""
        cfg = self.cfg
        npy, parquet, done = part_files(self.out, cfg.modality, part.name)
        if done.is_file():
            return -1
        items = load_items(cfg.spec, part)
        unreadable = [{"id": id_, "reason": reason} for id_, reason in items.lost]
        rows, embeddings = [], None
        if items.inputs and cfg.modality == "text":
            embeddings = embed_texts(self.model, self.tokenizer, items.inputs,
                                     batch_size=cfg.batch_size, progress=False)
            rows = items.rows
        elif items.inputs:
            ids = [row["id"] for row in items.rows]
            try:
                result = embed_images(self.model, items.inputs, ids=ids,
                                      transform=self.transform, batch_size=cfg.batch_size,
                                      num_workers=cfg.num_workers, progress=False)
            except DataError:  # none of the part's images could be read
                result = None
                unreadable += [{"id": id_, "reason": reason} for id_, reason in
                               zip(ids, _reasons(items.inputs))]
            if result is not None:
                embeddings = result.embeddings
                rows = [items.rows[i] for i in result.indices.tolist()]
                unreadable += [{"id": id_, "reason": reason}
                               for id_, reason in zip(result.skipped, result.reasons)]
        if embeddings is not None and embeddings.ndim != 2:
            raise ConfigError(f"{cfg.model}: the {self.model.config.family} family embeds an "
                              f"input as {tuple(embeddings.shape[1:])} vectors; vlp embed "
                              "--out DIR indexes one vector per input")
        array = (embeddings.numpy() if embeddings is not None
                 else np.zeros((0, self.dim()), np.float32)).astype(cfg.dtype)
        atomic_write(npy, lambda temp: np.save(temp, array))
        write_parquet(parquet, rows)
        summary = {"name": part.name, "count": len(rows), "dim": int(array.shape[1]),
                   "unreadable": unreadable}
        atomic_write_text(done, json.dumps(summary) + "\n")
        return len(rows)


def _reasons(inputs: list[Any]) -> list[str]:
    from vlp.data.images import open_image

    return [r if isinstance(r := open_image(i), str) else "corrupt_image" for i in inputs]


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """The metadata rows as Parquet (pyarrow), atomically; columns `METADATA_COLUMNS`."""
    pa, pq = import_pyarrow()
    schema = pa.schema([("id", pa.string()), ("path", pa.string()), ("key", pa.string()),
                        ("caption", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])
    table = pa.Table.from_pylist([{c: row[c] for c in METADATA_COLUMNS} for row in rows],
                                 schema=schema)
    atomic_write(path, lambda temp: pq.write_table(table, temp))


def import_pyarrow() -> tuple[Any, Any]:
    pq = require_extra("pyarrow.parquet", "faiss", "vlp embed --out DIR (Parquet metadata)")
    return sys.modules["pyarrow"], pq


# -- running the parts --------------------------------------------------------------------------

def _rank() -> tuple[int, int]:
    """(rank, world size) under torchrun (its environment), else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def embed_collection(cfg: EmbedConfig) -> dict[str, Any]:
    """Embed every part of ``cfg.data`` not yet in ``cfg.out``; returns what was done."""
    cfg.check()
    import_pyarrow()
    parts = plan_parts(cfg.spec, cfg.part_size)
    out = _open_out(cfg, parts)
    rank, world = _rank()
    if cfg.backend == "ray" and world > 1:
        raise ConfigError("--backend ray runs its own workers; start it once, not under torchrun")
    if world > 1 and cfg.device == "cuda":
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    mine = [p for p in parts if p.index % world == rank]
    for part in mine:  # temporary files of this process's parts left by a killed run
        for file in part_files(out, cfg.modality, part.name):
            for temp in file.parent.glob(f".{file.name}.tmp-*"):
                temp.unlink(missing_ok=True)
    todo = [p for p in mine if not part_files(out, cfg.modality, p.name)[2].is_file()]
    if todo and cfg.backend == "ray":
        _run_ray(cfg, todo)
    elif todo:
        worker = PartWorker(cfg)
        for part in tqdm(todo, desc="embed", unit="part", disable=not cfg.progress):
            worker.run(part)
    result = {"out": str(out), "parts": len(parts), "embedded": len(todo),
              "already_done": len(mine) - len(todo)}
    if world > 1:
        result["rank"], result["world_size"] = rank, world
    summary = finish(out, cfg.modality, parts)
    if summary is None:
        result["pending"] = "parts of other ranks are still running; summary.json comes last"
        return result
    return {**result, "count": summary["count"], "dim": summary["dim"],
            "unreadable": summary["unreadable_count"],
            "unreadable_first": summary["unreadable"][:10]}


def finish(out: Path, modality: str, parts: list[Part]) -> dict[str, Any] | None:
    """Write summary.json once every part is done (identical from any process); None before."""
    dones = [part_files(out, modality, p.name)[2] for p in parts]
    if not all(done.is_file() for done in dones):
        return None
    summaries = [read_json_object(done, DataError) for done in dones]
    unreadable = [entry for s in summaries for entry in s["unreadable"]]
    summary = {"count": sum(s["count"] for s in summaries), "dim": summaries[0]["dim"],
               "parts": len(parts), "unreadable_count": len(unreadable),
               "unreadable": unreadable}
    path = out / SUMMARY
    text = json.dumps(summary, indent=2) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return summary


# -- Ray ------------------------------------------------------------------------------------------

def import_ray() -> Any:
    require_extra("ray.data", "ray", "vlp embed --backend ray")
    return sys.modules["ray"]


class RayPartActor:
    """A Ray Data callable class: loads the model once per actor, then embeds the parts whose
    indices come in each batch."""

    def __init__(self, config: dict[str, Any], parts: list[tuple]) -> None:
        self.parts = {index: Part(index, *rest) for index, *rest in parts}
        self.worker = PartWorker(EmbedConfig(**config))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = [self.worker.run(self.parts[int(index)]) for index in batch["part"]]
        return {"part": np.asarray(batch["part"]), "rows": np.asarray(written)}


def _run_ray(cfg: EmbedConfig, parts: list[Part]) -> None:
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=cfg.progress)
        started = True
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = cfg.progress
        gpus = 1 if cfg.device.startswith("cuda") else 0
        threads = cfg.threads or 1
        config = {**asdict(cfg), "threads": threads, "progress": False, "backend": "local"}
        dataset = ray.data.from_items([{"part": p.index} for p in parts],
                                      override_num_blocks=len(parts))
        dataset = dataset.map_batches(
            RayPartActor, batch_size=1,
            fn_constructor_kwargs={"config": config,
                                   "parts": [(p.index, p.shard, p.start, p.stop) for p in parts]},
            compute=ray.data.ActorPoolStrategy(size=min(cfg.ray_actors, len(parts))),
            num_cpus=threads, num_gpus=gpus)
        for _ in dataset.iter_rows():  # each row: a part now on disk
            pass
    finally:
        if started:
            ray.shutdown()


# -- vectors computed elsewhere --------------------------------------------------------------------

def write_vectors(out: str | os.PathLike[str], parts: Any, *, model: str = "",
                  dtype: str = "float32") -> Path:
    """A `vlp embed`-layout directory of vectors computed elsewhere (one ``[rows, dim]`` array
    per part, normalised here), so `vlp index` can index them; metadata ids are row numbers.
    ``model`` names the model that made them (what `vlp search` embeds queries with)."""
    out = Path(out)
    if (out / MANIFEST).exists():
        raise ConfigError(f"{out}: already holds a collection")
    for sub in ("img_emb", "metadata", "parts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    described, start = [], 0
    for index, array in enumerate(parts):
        array = np.asarray(array, dtype=np.float32)
        if array.ndim != 2:
            raise ConfigError(f"part {index}: vectors must be [rows, dim], got {array.shape}")
        array /= np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
        name = Part(index).name
        npy, parquet, done = part_files(out, "image", name)
        atomic_write(npy, lambda temp, a=array: np.save(temp, a.astype(dtype)))
        write_parquet(parquet, [{"id": str(row), "path": "", "key": None, "caption": None,
                                 "offset": None, "size": None}
                                for row in range(start, start + len(array))])
        atomic_write_text(done, json.dumps({"name": name, "count": len(array),
                                            "dim": int(array.shape[1]), "unreadable": []}) + "\n")
        described.append({"name": name, "rows": [start, start + len(array)]})
        start += len(array)
    manifest = {"format": FORMAT, "version": 1, "model": model, "modality": "image",
                "source": {"data": "vectors", "kind": "vectors", "options": {}},
                "part_size": 0, "dtype": dtype, "parts": described}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    finish(out, "image", [Part(i) for i in range(len(described))])
    return out
