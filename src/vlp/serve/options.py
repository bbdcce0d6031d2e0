"""The flags of `vlp serve` and the call they make (`vlp.cli` stays a thin shell; nothing here
imports FastAPI or a model until the server starts)."""

from __future__ import annotations

import argparse
import os

from vlp.cliargs import add_decode_args


def add_serve_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("model", help=model_help + "; text endpoints need its tokenizer")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--index", metavar="INDEX_DIR",
                   help="a vlp index directory built with this model: POST /v1/search and "
                        "search on the page (needs the faiss extra; default: none)")
    add_decode_args(p)  # every endpoint that reads an uploaded image
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=8,
                   help="most concurrent requests run as one batch (1: no batching; "
                        "default: %(default)s)")
    g.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests after its first, while "
                        "more are arriving (default: %(default)s)")
    g.add_argument("--max-queue", type=int, default=1024,
                   help="requests waiting beyond this are answered 503 (default: %(default)s)")
    g = p.add_argument_group("security and limits")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 except "
                                     "/v1/health (default: $VLP_API_KEY, else none)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; default: none)")
    g.add_argument("--max-body-bytes", type=int, default=10 * 1024 * 1024,
                   help="largest request body; 413 beyond (default: %(default)s)")
    g.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest image, width x height read from its header before decoding; "
                        "413 beyond (default: %(default)s)")
    g.add_argument("--max-text-chars", type=int, default=1000,
                   help="longest text, label, question or prompt (default: %(default)s)")
    g.add_argument("--max-texts", type=int, default=64,
                   help="texts per request (default: %(default)s)")
    g.add_argument("--max-labels", type=int, default=100,
                   help="zero-shot labels per request (default: %(default)s)")
    g.add_argument("--max-results", type=int, default=100,
                   help="largest k of /v1/search (default: %(default)s)")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per request; 504 beyond (default: %(default)s)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def serve_from_args(args: argparse.Namespace) -> None:
    from vlp.serve import serve
    from vlp.serve.limits import Limits
    from vlp.train.distributed import check_device

    limits = Limits(max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels,
                    max_text_chars=args.max_text_chars, max_texts=args.max_texts,
                    max_labels=args.max_labels, max_results=args.max_results,
                    timeout_s=args.timeout)
    check_device(args.device)  # before the model is read or the port is taken
    serve(args.model, host=args.host, port=args.port, device=args.device, index=args.index,
          fast_decode=args.fast_decode, log_level=args.log_level, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms,
          max_queue=args.max_queue, api_key=args.api_key or os.environ.get("VLP_API_KEY"),
          cors_origins=tuple(args.cors_origin), limits=limits.check())
