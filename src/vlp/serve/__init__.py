"""`vlp serve`: a model behind an HTTP API (FastAPI + uvicorn, the ``serve`` extra) and a page.

``serve(path, ...)`` loads a model directory (`vlp.factory.load_model_and_transforms`) and
answers ``POST /v1/embed/image``, ``/v1/embed/text``, ``/v1/zeroshot``, ``/v1/caption``,
``/v1/vqa``, ``/v1/itm`` (each where the family serves it: `PretrainModel.tasks`),
``/v1/search`` (with ``--index``: `vlp.search.Index`),
``GET /v1/health``, ``/v1/models``, the OpenAPI page at ``/docs`` and a web page at ``/``.
Concurrent requests are batched (`vlp.serve.batching`); what a client may send is bounded
(`vlp.serve.limits`). Importing this package imports neither FastAPI nor a model.
"""

from __future__ import annotations

import os
from typing import Any


def serve(path: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8000,
          device: str = "cpu", log_level: str = "info", index: str | None = None,
          fast_decode: bool = False, **settings: Any) -> None:
    """Serve the model directory ``path`` until interrupted (with ``/v1/search`` over the
    `vlp index` directory ``index``); ``fast_decode``: uploaded JPEGs decode at a reduced
    scale (`vlp.data.transforms.ImageTransform.draft_size`); ``settings`` are
    `vlp.serve.app.Settings` fields (max_batch, max_wait_ms, api_key, cors_origins,
    limits)."""
    from vlp.serve.server import run

    run(path, host=host, port=port, device=device, log_level=log_level, index=index,
        fast_decode=fast_decode, **settings)


__all__ = ["serve"]
