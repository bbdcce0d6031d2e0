"""Search at scale: embedding throughput against open_clip, and faiss index build time, memory,
recall@10 and query latency per index kind.

``embed``: images per second of vlp's embedding path (`vlp.eval.embed_images`: decode,
transform, ``encode_image``, normalise) against open_clip's (PIL decode, its ``preprocess``,
``encode_image(normalize=True)``) on the same image files, model shape and batch, plus the
model alone (``encode_image`` on the same pixels) -- ratios vlp / open_clip from the same run,
the two taking turns (ABBA) every repeat. Random init: equal parameter counts are asserted.

``index``: random L2-normalised vectors (seeded) written as a `vlp embed` directory
(`vlp.search.embed.write_vectors`, float16 parts), then for each size and kind one
subprocess builds the index through `vlp.search.build_index` (tuned to --recall on held-out
vectors), and reports build seconds, the process's peak RSS over its RSS before building, the
index file size, recall@10 against exact search on fresh query vectors (never in the
collection), and single-query latency p50/p99. Random vectors have no cluster structure, the
hardest case for an inverted file: real embeddings reach a recall with far fewer probes.

    .venv/bin/python benchmarks/search.py                         # both parts, 1M vectors
    .venv/bin/python benchmarks/search.py --part index --sizes 100000 --kinds flat,hnsw

Results: benchmarks/results/search_cpu.json (device, versions, settings, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
SIZES = (100_000, 1_000_000)
KINDS = ("flat", "ivf-pq", "hnsw")


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU ({line.split(':', 1)[1].strip()}, {os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


# -- embedding throughput -------------------------------------------------------------------------

def embed_benchmark(args: argparse.Namespace) -> list[dict]:
    from vlp.data.synthetic import write_dataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, arch, size in (("clip-tiny", None, 64), ("clip-vit-b-32", "ViT-B-32", 224)):
            images = Path(tmp) / f"world{size}"
            write_dataset(images, formats=["csv"], n_train=1, n_val=1, n_test=args.images,
                          image_size=size, captions_per_image=1, progress=False)
            paths = sorted(str(p) for p in (images / "images" / "test").glob("*.jpg"))
            rows.append(measure_embed(preset, arch, size, paths, args))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_embed(preset: str, arch: str | None, size: int, paths: list[str],
                  args: argparse.Namespace) -> dict:
    import open_clip
    import torch
    from PIL import Image

    import vlp
    from vlp.eval.embed import embed_images

    torch.manual_seed(0)
    ours = vlp.create_model(preset).eval()
    if arch is None:
        from train_throughput import open_clip_config

        theirs = open_clip.CLIP(**open_clip_config("clip-tiny")).eval()
        preprocess = open_clip.image_transform(size, is_train=False)
    else:
        theirs, _, preprocess = open_clip.create_model_and_transforms(arch)
        theirs.eval()
    params = [sum(p.numel() for p in m.parameters()) for m in (theirs, ours)]
    assert params[0] == params[1], f"parameter counts differ: {params}"
    batch = args.batch
    pixels = torch.randn(batch, 3, size, size)
    steps = max(1, len(paths) // batch)

    def run_vlp() -> float:
        start = time.perf_counter()
        embed_images(ours, paths, batch_size=batch, progress=False)
        return len(paths) / (time.perf_counter() - start)

    def run_open_clip() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(paths), batch):
                chunk = torch.stack([preprocess(Image.open(p).convert("RGB"))
                                     for p in paths[i:i + batch]])
                theirs.encode_image(chunk, normalize=True)
        return len(paths) / (time.perf_counter() - start)

    def model_only(model) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(steps):
                model.encode_image(pixels, normalize=True)
        return steps * batch / (time.perf_counter() - start)

    run_vlp(), run_open_clip()  # warm-up
    per = {"vlp": [], "open_clip": [], "vlp_model": [], "open_clip_model": []}
    for repeat in range(args.repeats):
        order = [("vlp", run_vlp), ("open_clip", run_open_clip),
                 ("vlp_model", lambda: model_only(ours)),
                 ("open_clip_model", lambda: model_only(theirs))]
        for name, fn in order if repeat % 2 == 0 else order[::-1]:
            per[name].append(fn())
    median = {k: round(statistics.median(v), 2) for k, v in per.items()}
    return {"model": preset, "open_clip_model": arch or "CLIP(clip-tiny config)",
            "image_size": size, "images": len(paths), "batch": batch, "parameters": params[1],
            "images_per_s": median,
            "ratio_pipeline": round(median["vlp"] / median["open_clip"], 3),
            "ratio_encode_image": round(median["vlp_model"] / median["open_clip_model"], 3),
            "per_repeat_ratio_pipeline": [round(a / b, 3) for a, b in
                                          zip(per["vlp"], per["open_clip"])],
            "load_average": load_average()}


# -- indexes --------------------------------------------------------------------------------------

def write_collection(directory: Path, count: int, dim: int, seed: int) -> None:
    from vlp.search.embed import write_vectors

    rng = np.random.default_rng(seed)
    chunk = 100_000
    parts = (rng.standard_normal((min(chunk, count - start), dim), dtype=np.float32)
             for start in range(0, count, chunk))
    write_vectors(directory, parts, model="random vectors", dtype="float16")


def build_worker(request: dict) -> dict:
    """In a subprocess: build one index, then measure recall and latency on fresh queries."""
    import faiss

    from vlp.search import Index, IndexConfig, build_index
    from vlp.search.index import recall_at

    def rss_mb(field: str = "VmHWM") -> float:
        """This process's peak (VmHWM) or current (VmRSS) resident memory; ru_maxrss would
        carry the parent's peak across fork and exec."""
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    before = rss_mb("VmRSS")
    started = time.perf_counter()
    record = build_index(IndexConfig(request["emb"], request["out"], kind=request["kind"],
                                     recall=request["recall"], queries=request["queries"],
                                     threads=request["threads"]), log=lambda line: None)
    seconds = time.perf_counter() - started
    peak = rss_mb()
    index = Index(request["out"])
    queries = np.load(request["queries_file"])
    truth = np.load(request["truth_file"])
    found = np.full((len(queries), 10), -1, np.int64)
    for i, results in enumerate(index.search(queries, 10)):
        rows = [int(r["id"]) for r in results]
        found[i, :len(rows)] = rows
    latencies = []
    faiss.omp_set_num_threads(1)  # one query at a time, as a server answers it
    for query in queries[:request["latency_queries"]]:
        start = time.perf_counter()
        index.index.search(query[None], 10)
        latencies.append((time.perf_counter() - start) * 1000)
    return {"kind": record["kind"], "factory": record["factory"], "count": record["count"],
            "build_seconds": round(seconds, 2), "train_seconds": record["train_seconds"],
            "peak_rss_mb": round(peak, 1), "rss_before_build_mb": round(before, 1),
            "memory_estimate_mb": round(record["memory_estimate_bytes"] / 2**20, 1),
            "index_file_mb": round(record["index_file_bytes"] / 2**20, 1),
            "params": record["params"], "tuned_recall_at_10": round(record["recall_at_10"], 4),
            "recall_target": record["recall_target"],
            "held_out_recall_at_10": round(recall_at(found, truth), 4),
            "latency_ms_p50": round(float(np.percentile(latencies, 50)), 3),
            "latency_ms_p99": round(float(np.percentile(latencies, 99)), 3),
            "load_average": load_average()}


def exact_truth(emb: Path, queries: np.ndarray) -> np.ndarray:
    from vlp.search.index import exact_top, open_collection

    return exact_top(open_collection(emb), queries, 10)


def index_benchmark(args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    dim = args.dim
    rng = np.random.default_rng(args.seed + 1)
    queries = rng.standard_normal((args.queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for size in args.sizes:
        emb = work / f"emb-{size}"
        started = time.perf_counter()
        write_collection(emb, size, dim, args.seed)
        write_s = time.perf_counter() - started
        truth = exact_truth(emb, queries)
        np.save(work / "queries.npy", queries)
        np.save(work / "truth.npy", truth)
        for kind in args.kinds:
            if kind == "hnsw" and size > args.hnsw_max:
                rows.append({"kind": kind, "count": size, "built": False,
                             "reason": f"above --hnsw-max {args.hnsw_max}: a graph build over "
                                       "this many 512-d vectors does not fit the time bound on "
                                       "this machine"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            request = {"emb": str(emb), "out": str(work / f"idx-{size}-{kind}"), "kind": kind,
                       "recall": args.recall, "queries": args.tuning_queries,
                       "threads": args.threads, "queries_file": str(work / "queries.npy"),
                       "truth_file": str(work / "truth.npy"),
                       "latency_queries": args.latency_queries}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(request)],
                                  capture_output=True, text=True, timeout=args.timeout)
            if done.returncode != 0:
                rows.append({"kind": kind, "count": size, "built": False,
                             "reason": done.stderr.strip().splitlines()[-1:]})
            else:
                rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "built": True,
                             "collection_write_seconds": round(write_s, 2),
                             "vectors_float32_mb": round(size * dim * 4 / 2**20, 1)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(work / f"idx-{size}-{kind}", ignore_errors=True)
        shutil.rmtree(emb, ignore_errors=True)
    return rows


def not_built(rows: list[dict], sizes: list[int], dim: int) -> list[dict]:
    """What the largest built sizes imply for ``sizes`` not built here: memory from the
    builder's own estimate, time (writing the collection, then building) scaled linearly from
    the largest build of each kind. Estimates, never measurements."""
    from vlp.search.index import IndexConfig, memory_estimate

    out = []
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for size in sizes:
        for kind in KINDS:
            built = [r for r in rows if r.get("built") and r["kind"] == kind]
            if not built or any(r["count"] >= size for r in built):
                continue
            largest = max(built, key=lambda r: r["count"])
            scale = size / largest["count"]
            memory = memory_estimate(kind, size, dim, IndexConfig("", ""))
            seconds = (largest["build_seconds"] + largest["collection_write_seconds"]) * scale
            reasons = []
            if memory > ram / 2:
                reasons.append(f"the index alone needs {memory / 2**30:.1f} GiB of this "
                               f"machine's {ram / 2**30:.1f} GiB, shared with other jobs")
            if seconds > 900:
                reasons.append(f"about {seconds / 60:.0f} minutes to write and build, over the "
                               "15 minute bound of this benchmark")
            out.append({"kind": kind, "count": size, "built": False,
                        "memory_estimate_mb": round(memory / 2**20),
                        "float32_vectors_mb": round(size * dim * 4 / 2**20),
                        "estimated_seconds_write_and_build": round(seconds),
                        "estimated_from": f"{kind} at {largest['count']}",
                        "reason": "not built: " + ("; ".join(reasons) or "not asked for")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=["all", "embed", "index"], default="all")
    parser.add_argument("--images", type=int, default=64, help="embed: image files")
    parser.add_argument("--batch", type=int, default=32, help="embed: batch size")
    parser.add_argument("--repeats", type=int, default=4, help="embed: timed repeats")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=list(SIZES), help="index: collection sizes")
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--tuning-queries", type=int, default=500)
    parser.add_argument("--queries", type=int, default=500, help="held-out recall queries")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--hnsw-max", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=0, help="faiss build threads")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per index build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--estimate-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[10_000_000], help="sizes recorded as estimates, not built")
    parser.add_argument("--out", default=str(ROOT / "results" / "search_cpu.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(build_worker(json.loads(args.worker))))
        return
    import faiss
    import open_clip
    import torch

    import vlp

    sys.path.insert(0, str(ROOT))
    report = {"benchmark": "search", "device": cpu_name(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
              "open_clip": open_clip.__version__, "vlp": vlp.__version__,
              "python": platform.python_version(), "load_average_start": load_average()}
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out", "part")}
    out = Path(args.out)
    if out.is_file():  # keep the other part's results when only one part runs
        previous = json.loads(out.read_text())
        report.update({k: previous[k] for k in ("embed", "embed_settings", "index",
                                                "index_settings", "not_built")
                       if k in previous})
    if args.part in ("all", "embed"):
        report["embed_settings"] = settings
        report["embed"] = embed_benchmark(args)
    if args.part in ("all", "index"):
        report["index_settings"] = settings
        with tempfile.TemporaryDirectory(dir=os.environ.get("VLP_BENCH_TMP")) as tmp:
            report["index"] = index_benchmark(args, Path(tmp))
    report["not_built"] = not_built(report.get("index", []), args.estimate_sizes, args.dim)
    report["load_average_end"] = load_average()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT.parent) if out.is_relative_to(ROOT.parent) else out}")


if __name__ == "__main__":
    main()
