"""Start `vlp serve`: check the optional dependencies, load the model, run uvicorn."""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from vlp.errors import ConfigError

REQUIRED = ("fastapi", "uvicorn", "multipart")  # the serve extra (multipart: python-multipart)
logger = logging.getLogger(__name__)


def check_installed() -> None:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"vlp serve needs {', '.join(missing)}: pip install 'vlp[serve]'")


def run(path: str | os.PathLike[str], *, host: str, port: int, device: str = "cpu",
        log_level: str = "info", index: str | None = None, fast_decode: bool = False,
        **settings: Any) -> None:
    check_installed()
    import uvicorn

    from vlp.serve.app import Settings, create_app
    from vlp.serve.engine import ServedModel

    model = ServedModel(path, device=device, index=index, fast_decode=fast_decode)
    app = create_app(model, Settings(**settings))
    logger.info("serving %s (%s: %s) on http://%s:%d", model.name, model.family,
                ", ".join(model.tasks()), host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                timeout_keep_alive=5, timeout_graceful_shutdown=5,
                limit_concurrency=settings.get("max_queue", 1024) + 64)
