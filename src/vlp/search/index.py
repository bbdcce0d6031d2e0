"""`vlp index EMB_DIR --out INDEX_DIR`: a faiss index over `vlp embed`'s parts, inner product
on L2-normalised vectors (cosine), with the parts' metadata beside it.

Kinds: ``flat`` (exact); ``ivf-pq`` (an inverted file of 4-bit product-quantised codes
searched by SIMD fast scan, trained on a sample, with an 8-bit scalar-quantised copy of every
vector that re-ranks the candidates: about ``dim + dim/8`` bytes a vector instead of
``4 * dim``); ``hnsw`` (a graph over the full vectors). ``auto`` is flat up to `FLAT_MAX`
vectors, else ivf-pq. An approximate index is tuned on held-out queries (vectors of the
collection kept out of training and out of the index while it is tuned, added after): its
search parameters grow until recall@10 against exact search reaches the target, and the
chosen parameters and the recall reached are recorded in ``index.json``.

faiss (``faiss-cpu``) and pyarrow are the ``faiss`` extra, imported only here.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlp.errors import ConfigError, DataError, require_extra
from vlp.search.embed import FORMAT, MANIFEST, finish, part_files
from vlp.search.parts import Part
from vlp.store.files import atomic_write, atomic_write_text, read_json_object

KINDS = ("auto", "flat", "ivf-pq", "hnsw")
FLAT_MAX = 100_000  # auto: exact search up to this many vectors
ADD_CHUNK = 65_536
INDEX_FILE, INDEX_JSON, METADATA = "index.faiss", "index.json", "metadata.parquet"
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
K_FACTORS = (1, 2, 4, 8, 16, 32, 64)
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def import_faiss() -> Any:
    return require_extra("faiss", "faiss", "vlp index and vlp search")


@dataclass
class IndexConfig:
    embeddings: str
    out: str
    kind: str = "auto"
    recall: float = 0.95
    queries: int = 500  # held-out tuning queries
    train_size: int = 0  # vectors the ivf-pq training sees (0: 64 per list, at least 10k)
    nlist: int = 0  # ivf-pq inverted lists (0: about sqrt(n), a power of two)
    pq_bytes: int = 0  # ivf-pq code bytes per vector (0: dim / 8)
    hnsw_m: int = 32
    ef_construction: int = 80
    seed: int = 0
    threads: int = 0  # faiss threads (0: its default)
    progress: bool = True

    def check(self) -> IndexConfig:
        if self.kind not in KINDS:
            raise ConfigError(f"--kind must be one of {KINDS}, got {self.kind!r}")
        if not 0 < self.recall <= 1:
            raise ConfigError(f"--recall must be in (0, 1], got {self.recall}")
        if self.queries < 1:
            raise ConfigError(f"--queries must be >= 1, got {self.queries}")
        return self


# -- reading vlp embed's output ---------------------------------------------------------------

@dataclass
class Collection:
    directory: Path
    manifest: dict[str, Any]
    arrays: list[np.ndarray]  # one memory-mapped [rows, dim] array per part
    metadata: list[Path]

    @property
    def count(self) -> int:
        return sum(a.shape[0] for a in self.arrays)

    @property
    def dim(self) -> int:
        return next(a.shape[1] for a in self.arrays)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) across parts as float32."""
        out, offset = [], 0
        for array in self.arrays:
            lo, hi = max(start - offset, 0), min(stop - offset, array.shape[0])
            if lo < hi:
                out.append(np.asarray(array[lo:hi], dtype=np.float32))
            offset += array.shape[0]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows)
        taken = np.empty((len(rows), self.dim), np.float32)
        bounds = np.cumsum([0] + [a.shape[0] for a in self.arrays])
        for position, row in zip(order, rows[order]):
            part = int(np.searchsorted(bounds, row, side="right") - 1)
            taken[position] = self.arrays[part][row - bounds[part]]
        return taken


def open_collection(directory: str | Path) -> Collection:
    """The parts of a finished `vlp embed` output; a clear error when parts are missing."""
    directory = Path(directory)
    manifest = read_json_object(directory / MANIFEST, DataError)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{directory / MANIFEST}: not a vlp embed output (format "
                        f"{manifest.get('format')!r})")
    modality = manifest["modality"]
    parts = [Part(i) for i in range(len(manifest["parts"]))]
    missing = [p.name for p in parts if not part_files(directory, modality, p.name)[2].is_file()]
    if missing:
        raise DataError(f"{directory}: {len(missing)} of {len(parts)} parts not embedded yet "
                        f"(first {missing[0]}); rerun vlp embed with the same settings")
    finish(directory, modality, parts)
    arrays, metadata = [], []
    for part in parts:
        npy, parquet, _ = part_files(directory, modality, part.name)
        arrays.append(np.load(npy, mmap_mode="r"))
        metadata.append(parquet)
    if sum(a.shape[0] for a in arrays) == 0:
        raise DataError(f"{directory}: no embeddings (every input was unreadable)")
    return Collection(directory, manifest, arrays, metadata)


# -- building ----------------------------------------------------------------------------------

def choose_kind(kind: str, count: int) -> str:
    if kind != "auto":
        return kind
    return "flat" if count <= FLAT_MAX else "ivf-pq"


def ivf_pq_shape(cfg: IndexConfig, count: int, dim: int) -> tuple[int, int]:
    """(nlist, code bytes) for ``count`` vectors of width ``dim``."""
    nlist = cfg.nlist or int(2 ** round(math.log2(max(math.sqrt(count), 1))))
    nlist = max(1, min(nlist, count // 39))  # faiss wants >= 39 training points per list
    pq_bytes = cfg.pq_bytes or max(1, dim // 8)
    while dim % (2 * pq_bytes):
        pq_bytes -= 1
    return nlist, pq_bytes


def memory_estimate(kind: str, count: int, dim: int, cfg: IndexConfig) -> int:
    """Bytes the index holds in memory (vectors, codes, ids, graph links), before building."""
    if kind == "flat":
        return count * dim * 4
    if kind == "hnsw":
        return count * (dim * 4 + cfg.hnsw_m * 2 * 4 * 1.1)
    nlist, pq_bytes = ivf_pq_shape(cfg, count, dim)
    # codes + ids per vector, the refining 8-bit copy, centroids and codebooks
    return int(count * (pq_bytes + 8 + dim) + nlist * dim * 4 + 256 * dim * 4)


def _sample(count: int, size: int, rng: np.random.Generator, exclude: np.ndarray | None = None
            ) -> np.ndarray:
    pool = np.setdiff1d(np.arange(count), exclude) if exclude is not None else np.arange(count)
    return np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))


def _new_index(faiss: Any, kind: str, cfg: IndexConfig, count: int, dim: int) -> tuple[Any, str]:
    if kind == "flat":
        return faiss.IndexFlatIP(dim), "Flat"
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        return index, f"HNSW{cfg.hnsw_m}"
    nlist, pq_bytes = ivf_pq_shape(cfg, count, dim)
    # 4-bit codes (two per byte) searched with SIMD fast scan: 16 centroids a sub-vector train
    # in seconds where 256 take minutes, and the 8-bit copy re-ranks what they find
    factory = f"IVF{nlist},PQ{2 * pq_bytes}x4fs,Refine(SQ8)"
    return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT), factory


def build_index(cfg: IndexConfig, log: Any = print) -> dict[str, Any]:
    """Build, tune and write the index of ``cfg.embeddings`` into ``cfg.out``; returns what
    ``index.json`` records."""
    cfg.check()
    faiss = import_faiss()
    from vlp.search.embed import import_pyarrow

    pa, pq = import_pyarrow()
    if cfg.threads > 0:
        faiss.omp_set_num_threads(cfg.threads)
    collection = open_collection(cfg.embeddings)
    count, dim = collection.count, collection.dim
    kind = choose_kind(cfg.kind, count)
    if kind == "ivf-pq" and count < 39 * 2:
        raise ConfigError(f"{cfg.embeddings}: {count} vectors are too few for ivf-pq; use "
                          "--kind flat")
    estimate = memory_estimate(kind, count, dim, cfg)
    log(f"vlp index: {count} vectors of {dim} dims, kind {kind}: about "
        f"{estimate / 2**20:.1f} MiB in memory")
    rng = np.random.default_rng(cfg.seed)
    index, factory = _new_index(faiss, kind, cfg, count, dim)
    started = time.perf_counter()
    # approximate kinds hold tuning queries out: the index gets every other vector first, is
    # tuned with the held-out ones as queries, then gets them too (its rows end with them;
    # the metadata is written in the index's row order)
    held_out = (_sample(count, min(cfg.queries, count // 10), rng) if kind != "flat"
                else np.zeros(0, np.int64))
    if kind == "ivf-pq":
        nlist, _ = ivf_pq_shape(cfg, count, dim)
        size = cfg.train_size or max(10_000, 64 * nlist)
        index.train(collection.take(_sample(count, size, rng, exclude=held_out)))
    train_s = time.perf_counter() - started
    keep = np.ones(count, bool)
    keep[held_out] = False
    for start in range(0, count, ADD_CHUNK):
        stop = min(start + ADD_CHUNK, count)
        index.add(np.ascontiguousarray(collection.rows(start, stop)[keep[start:stop]]))
    params, recall = {}, 1.0
    if kind != "flat":
        params, recall = tune(faiss, index, kind, collection, held_out, keep, cfg.recall)
        if recall < cfg.recall:
            log(f"vlp index: recall@10 {recall:.3f} stays below the target {cfg.recall} with "
                f"the most thorough search tried ({params}); the index is written with it")
        index.add(collection.take(held_out))
    build_s = time.perf_counter() - started
    order = np.concatenate([np.flatnonzero(keep), held_out])  # index row -> collection row
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / INDEX_FILE, lambda temp: faiss.write_index(index, temp))
    metadata = pa.concat_tables([pq.read_table(path) for path in collection.metadata])
    if kind != "flat":
        metadata = metadata.take(pa.array(order))
    atomic_write(out / METADATA, lambda temp: pq.write_table(metadata, temp))
    record = {"format": "vlp-index", "version": 1, "kind": kind, "factory": factory,
              "metric": "inner_product", "count": count, "dim": dim,
              "model": collection.manifest["model"], "modality": collection.manifest["modality"],
              "embeddings": str(collection.directory.resolve()), "params": params,
              "recall_at_10": recall, "recall_target": cfg.recall if kind != "flat" else None,
              "tuning_queries": len(held_out), "memory_estimate_bytes": int(estimate),
              "index_file_bytes": (out / INDEX_FILE).stat().st_size,
              "train_seconds": round(train_s, 3), "build_seconds": round(build_s, 3)}
    atomic_write_text(out / INDEX_JSON, json.dumps(record, indent=2) + "\n")
    return record


def set_params(faiss: Any, index: Any, params: dict[str, int]) -> None:
    """Apply tuned search parameters (nprobe, k_factor, efSearch)."""
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = params["efSearch"]
    if "k_factor" in params:
        refine = faiss.downcast_index(index)
        refine.k_factor = params["k_factor"]
        faiss.extract_index_ivf(refine.base_index).nprobe = params["nprobe"]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k found in its returned top-k (-1: no result)."""
    return float(query_recalls(found, truth).mean())


def query_recalls(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t)
                     for f, t in zip(found, truth)])


def lower_bound(recalls: np.ndarray) -> float:
    """Mean recall less two standard errors: what new queries reach with ~97.5% confidence."""
    spread = recalls.std(ddof=1) / np.sqrt(len(recalls)) if len(recalls) > 1 else 0.0
    return float(recalls.mean() - 2 * spread)


def tune(faiss: Any, index: Any, kind: str, collection: Collection, held_out: np.ndarray,
         in_index: np.ndarray, target: float, k: int = 10) -> tuple[dict[str, int], float]:
    """The cheapest search parameters reaching ``target`` recall@k for the ``held_out``
    vectors as queries over the index holding the ``in_index`` rows (exact search over the
    same rows is the truth), or the most thorough ones tried with the recall they reach.

    A setting is accepted when the mean recall less two standard errors reaches the target,
    so the target holds for new queries, not only for these."""
    queries = collection.take(held_out)
    k = min(k, int(in_index.sum()))
    position = np.cumsum(in_index) - 1  # collection row -> index row
    truth = position[exact_top(collection, queries, k, in_index)]
    cache: dict[tuple, tuple[float, float]] = {}

    def measure(params: dict[str, int]) -> tuple[float, float]:
        key = tuple(sorted(params.items()))
        if key not in cache:
            set_params(faiss, index, params)
            recalls = query_recalls(index.search(queries, k)[1], truth)
            cache[key] = (float(recalls.mean()), lower_bound(recalls))
        return cache[key]

    if kind == "hnsw":
        grid = [[{"efSearch": ef} for ef in EF_SEARCH if ef >= k]]
    else:
        nlist = faiss.extract_index_ivf(faiss.downcast_index(index).base_index).nlist
        probes = [p for p in NPROBES if p < nlist] + [nlist]
        grid = [[{"nprobe": p, "k_factor": f} for f in K_FACTORS] for p in probes]
    # greedy ascent over (nprobe, k_factor) or efSearch, each step doubling what gains most
    at = (0, 0)
    while True:
        params = grid[at[0]][at[1]]
        recall, bound = measure(params)
        if bound >= target:
            break
        steps = [(at[0] + 1, at[1]), (at[0], at[1] + 1)]
        steps = [s for s in steps if s[0] < len(grid) and s[1] < len(grid[s[0]])]
        gains = [(measure(grid[i][j])[0], (i, j)) for i, j in steps]
        if not gains or max(gains)[0] <= recall + 1e-3:  # the most thorough search reached
            break
        at = max(gains)[1]
    set_params(faiss, index, params)
    return params, recall


def exact_top(collection: Collection, queries: np.ndarray, k: int,
              among: np.ndarray | None = None) -> np.ndarray:
    """Collection rows of each query's exact top-k by inner product (only rows where
    ``among`` is True, when given), streamed over the parts."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, collection.count, ADD_CHUNK):
        block = collection.rows(start, min(start + ADD_CHUNK, collection.count))
        scores = queries @ block.T
        if among is not None:
            scores[:, ~among[start:start + block.shape[0]]] = -np.inf
        ids = np.broadcast_to(np.arange(start, start + block.shape[0]), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, top, 1)
        best_ids = np.take_along_axis(ids, top, 1)
    return best_ids
