"""The flags and handlers of `vlp embed`, `vlp index` and `vlp search` (`vlp.cli` only adds
the parsers); nothing here imports faiss, pyarrow, Ray or a model until a command runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vlp.cliargs import add_decode_args, positive_int
from vlp.errors import ConfigError, DataError

SINGLE_FILE = (".safetensors", ".npy")


def _print(data: dict[str, Any]) -> None:
    # one write a line: the ranks of a torchrun job share one stdout
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def _check_device(name: str) -> Any:
    """The torch device `name` names if this machine has it (ConfigError otherwise)."""
    from vlp.train.distributed import check_device

    return check_device(name)


def add_embed_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("checkpoint", help=model_help)
    p.add_argument("--data", "--images", dest="images", metavar="SOURCE",
                   help="images: a directory, CSV/TSV/JSONL/COCO file or WebDataset shards "
                        "(brace pattern, directory)")
    p.add_argument("--texts", help="text file, one text per line")
    p.add_argument("--out", required=True,
                   help="a directory of parts (resumable), or one .safetensors/.npy file")
    p.add_argument("--batch-size", type=positive_int, default=256, help="(default: %(default)s)")
    add_decode_args(p)
    g = p.add_argument_group("parts (--out DIR)")
    g.add_argument("--kind", default="auto",
                   choices=["auto", "csv", "tsv", "jsonl", "coco", "imagefolder", "wds"],
                   help="source format (default: from the name)")
    g.add_argument("--part-size", type=positive_int, default=10_000,
                   help="images or texts per part of a table, directory or text file; a "
                        "WebDataset shard is one part (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="embedding file type (default: %(default)s)")
    g.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local: this process (each rank's share under torchrun); ray: Ray Data "
                        "actors, pip install 'vlp[ray]' (default: %(default)s)")
    g.add_argument("--device", default="cpu",
                   help="torch device; cuda under torchrun is each rank's GPU "
                        "(default: %(default)s)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch threads per process or Ray actor (default: torch's own; 1 per "
                        "Ray actor)")
    g.add_argument("--ray-actors", type=positive_int, default=2, help="(default: %(default)s)")
    g.add_argument("--ray-address", help="an existing Ray cluster (default: a local one)")
    g.add_argument("--image-key", help="CSV/JSONL column holding the image path")
    g.add_argument("--caption-key", help="CSV/JSONL column holding the caption")
    g.add_argument("--separator", help="CSV separator (default: tab for .tsv, else comma)")
    g.add_argument("--image-root", help="root of relative image paths / COCO image directory")


def embed_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if bool(args.images) == bool(args.texts):
        raise ConfigError("vlp embed: give exactly one of --data/--images or --texts")
    _check_device(args.device)
    if Path(args.out).suffix.lower() in SINGLE_FILE:
        return _embed_one_file(args)
    from vlp.search.embed import EmbedConfig, embed_collection

    options = {k: v for k in ("image_key", "caption_key", "separator", "image_root")
               if (v := getattr(args, k)) is not None}
    cfg = EmbedConfig(model=args.checkpoint, out=args.out, data=args.images or args.texts,
                      modality="image" if args.images else "text", kind=args.kind,
                      options=options, part_size=args.part_size, batch_size=args.batch_size,
                      dtype=args.dtype, backend=args.backend, device=args.device,
                      num_workers=args.num_workers, threads=args.threads,
                      ray_actors=args.ray_actors, ray_address=args.ray_address,
                      progress=not args.no_progress, fast_decode=args.fast_decode)
    return embed_collection(cfg)


def _embed_one_file(args: argparse.Namespace) -> dict[str, Any]:
    import vlp
    from vlp.data import build_source, infer_source_kind
    from vlp.eval import embed_images, embed_texts, save_embeddings

    model = vlp.load(args.checkpoint).to(_check_device(args.device))
    if args.images:
        images: Any = args.images  # an image directory, else a source (CSV/JSONL/COCO/shards)
        kind = args.kind if args.kind != "auto" else infer_source_kind(args.images)
        if kind != "imagefolder" or not Path(args.images).is_dir():
            options = {k: v for k in ("image_key", "caption_key", "separator", "image_root")
                       if (v := getattr(args, k)) is not None}
            if kind in ("csv", "tsv", "jsonl"):
                options.setdefault("caption_key", None)  # a list of images needs no captions
            images = build_source(kind, args.images, **options)
        result = embed_images(model, images, batch_size=args.batch_size,
                              num_workers=args.num_workers, progress=not args.no_progress,
                              fast_decode=args.fast_decode)
        embeddings, ids, skipped = result.embeddings, result.ids, len(result.skipped)
    else:
        file = Path(args.texts)
        if not file.is_file():
            raise DataError(f"{args.texts}: file not found")
        ids = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        embeddings = embed_texts(model, vlp.load_tokenizer(args.checkpoint), ids,
                                 batch_size=args.batch_size, progress=not args.no_progress)
        skipped = 0
    path = save_embeddings(args.out, embeddings, ids)
    return {"out": str(path), "count": int(embeddings.shape[0]),
            "dim": int(embeddings.shape[1]), "skipped": skipped}


def add_index_args(p: argparse.ArgumentParser) -> None:
    from vlp.search.index import FLAT_MAX, KINDS

    p.add_argument("embeddings", metavar="EMB_DIR", help="a vlp embed --out directory")
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="index directory")
    p.add_argument("--kind", default="auto", choices=KINDS,
                   help=f"flat: exact; ivf-pq: compressed, trained on a sample, re-ranked; "
                        f"hnsw: graph; auto: flat up to {FLAT_MAX} vectors, else ivf-pq "
                        f"(default: %(default)s)")
    p.add_argument("--recall", type=float, default=0.95,
                   help="recall@10 against exact search that tuning must reach on held-out "
                        "queries (default: %(default)s)")
    p.add_argument("--queries", type=positive_int, default=500,
                   help="held-out tuning queries (default: %(default)s)")
    p.add_argument("--nlist", type=int, default=0, help="ivf-pq lists (default: ~sqrt(n))")
    p.add_argument("--pq-bytes", type=int, default=0,
                   help="ivf-pq code bytes per vector (default: dim / 8)")
    p.add_argument("--train-size", type=int, default=0,
                   help="ivf-pq training sample (default: 64 per list, at least 10000)")
    p.add_argument("--hnsw-m", type=positive_int, default=32, help="hnsw links per node "
                                                         "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="faiss threads (default: all)")
    p.add_argument("--seed", type=int, default=0)


def index_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from vlp.search.index import IndexConfig, build_index

    cfg = IndexConfig(embeddings=args.embeddings, out=args.out, kind=args.kind,
                      recall=args.recall, queries=args.queries, nlist=args.nlist,
                      pq_bytes=args.pq_bytes, train_size=args.train_size, hnsw_m=args.hnsw_m,
                      threads=args.threads, seed=args.seed)
    return build_index(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))


def add_search_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("index", metavar="INDEX_DIR", help="a vlp index --out directory")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", metavar="PATH", help="an image query")
    query.add_argument("--texts-file", metavar="FILE",
                       help="one text query per line; one JSON object per line out")
    p.add_argument("-k", type=positive_int, default=10,
                   help="results per query (default: %(default)s)")
    p.add_argument("--model", help=model_help + " (default: the one the index was built with)")
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    add_decode_args(p)  # an --image query


def search_from_args(args: argparse.Namespace) -> None:
    from vlp.search.searcher import Index

    index = Index(args.index, model=args.model, device=str(_check_device(args.device)),
                  fast_decode=args.fast_decode)
    if args.texts_file:
        file = Path(args.texts_file)
        if not file.is_file():
            raise DataError(f"{args.texts_file}: file not found")
        texts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if not texts:
            raise DataError(f"{args.texts_file}: no non-empty lines")
        for text, results in zip(texts, index.search_texts(texts, args.k)):
            _print({"query": text, "results": results})
        return
    if args.text is not None:
        if not args.text.strip():
            raise ConfigError("--text is empty")
        results = index.search_texts([args.text], args.k)[0]
        _print({"query": args.text, "results": results})
        return
    if not Path(args.image).is_file():
        raise DataError(f"{args.image}: image file not found")
    _print({"query": args.image, "results": index.search_images([args.image], args.k)[0]})


def add_search_parsers(sub: Any, common: argparse.ArgumentParser, model_help: str) -> None:
    """`vlp embed`, `vlp index` and `vlp search`, each with its handler."""
    def handler(run: Any) -> Any:
        def call(args: argparse.Namespace) -> int:
            result = run(args)
            if result is not None:
                _print(result)
            return 0
        return call

    em = sub.add_parser("embed", parents=[common], help="write image or text embeddings",
                        description="Encode a collection into resumable parts (--out DIR: one "
                                    "per shard or --part-size inputs, Parquet metadata; local, "
                                    "Ray or torchrun) or into one .safetensors/.npy file.")
    add_embed_args(em, model_help)
    em.set_defaults(func=handler(embed_from_args))
    ix = sub.add_parser("index", help="build a faiss index over vlp embed's parts",
                        description="Exact or approximate (ivf-pq, hnsw: tuned to a recall@10 "
                                    "target) nearest-neighbour index with the metadata beside "
                                    "it. Needs pip install 'vlp[faiss]'.")
    add_index_args(ix)
    ix.set_defaults(func=handler(index_from_args))
    se = sub.add_parser("search", help="search an index by text or image",
                        description='Prints {"query", "results": [{"id", "score", "path", '
                                    '...}]} best first, one JSON object per query.')
    add_search_args(se, model_help)
    se.set_defaults(func=handler(search_from_args))
