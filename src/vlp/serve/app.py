"""The FastAPI app of `vlp serve`: endpoints, body and auth limits, errors as JSON, the page.

Every refusal is ``{"error": message}`` with a 4xx status; nothing a client sends reaches the
model unchecked (`vlp.serve.limits`), and the model runs on `Batcher`'s worker thread, never
on the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlp.errors import VlpError
from vlp.serve import schemas
from vlp.serve.batching import Batcher, QueueFull
from vlp.serve.engine import ServedModel
from vlp.serve.limits import (
    Limits,
    RequestError,
    check_image,
    check_int,
    check_templates,
    check_text,
    check_texts,
    decode_base64,
)

logger = logging.getLogger(__name__)
LIST_FIELDS = ("labels", "templates", "texts")
OPEN_PATHS = ("/v1/health",)  # answered without the API key


@dataclass(frozen=True)
class Settings:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    limits: Limits = Limits()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class GuardMiddleware:
    """ASGI middleware before the app: the API key on /v1 (401), the body size (413, from
    Content-Length when sent, else counted while it streams in) and the time to send it (408)."""

    def __init__(self, app: Any, max_body_bytes: int, api_key: str | None,
                 active: list[int], timeout_s: float) -> None:
        self.app, self.max_body_bytes, self.api_key = app, max_body_bytes, api_key
        self.timeout_s = timeout_s
        self.active = active  # [requests to /v1 being handled], read by the batcher

    def _authorised(self, scope: dict) -> bool:
        if not self.api_key or not scope["path"].startswith("/v1/") \
                or scope["path"] in OPEN_PATHS or scope.get("method") == "OPTIONS":
            return True
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                   self.api_key.encode())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("method") != "POST":
            return await self._guard(scope, receive, send)
        self.active[0] += 1
        try:
            return await self._guard(scope, receive, send)
        finally:
            self.active[0] -= 1

    async def _guard(self, scope: dict, receive: Callable, send: Callable) -> None:
        if not self._authorised(scope):
            response = _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                              {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        too_large = _error(413, f"request body over the limit of {self.max_body_bytes} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await too_large(scope, receive, send)
        try:  # read the body here, bounded in size and time, then replay it to the app
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            late = _error(408, f"request body not received within {self.timeout_s:g} s")
            return await late(scope, receive, send)
        if body is None:  # the client went away
            return
        if len(body) > self.max_body_bytes:
            return await too_large(scope, receive, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _read(self, receive: Callable) -> bytes | None:
        """The body, or its first max_body_bytes + 1 bytes; None if the client disconnects."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes or not message.get("more_body"):
                return b"".join(chunks)


def _form_value(values: list[Any]) -> Any:
    if len(values) == 1 and isinstance(values[0], str) and values[0].lstrip().startswith("["):
        try:
            return json.loads(values[0])  # a list sent as one JSON field
        except json.JSONDecodeError:
            raise RequestError(400, "a multipart list field is not valid JSON") from None
    return values


async def read_request(request: Request, limits: Limits,
                       image: bool = True) -> tuple[dict[str, Any], bytes | None]:
    """(fields, image bytes) of a JSON or multipart body; the image checked from its header."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    data: bytes | None = None
    if kind == "application/json":
        try:
            fields = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise RequestError(400, "the JSON body must be an object")
        if image:
            data = decode_base64(fields.get("image"))
    elif kind == "multipart/form-data":
        try:
            most = max(limits.max_texts, limits.max_labels, limits.max_templates)
            form = await request.form(max_files=1, max_fields=most + 16)
        except Exception as error:  # malformed multipart: starlette raises several kinds
            raise RequestError(400, f"malformed multipart body ({error})") from None
        fields = {key: (_form_value(form.getlist(key)) if key in LIST_FIELDS
                        else form.get(key)) for key in form.keys()}
        if image:
            upload = fields.get("image")
            if isinstance(upload, UploadFile):
                data = await upload.read()
            else:
                data = decode_base64(upload)
    else:
        raise RequestError(415, "send the body as application/json or multipart/form-data")
    if image:
        check_image(data, limits)
    return fields, data


def create_app(model: ServedModel, settings: Settings = Settings()) -> FastAPI:
    """The app serving ``model``; its `Batcher` starts now and stops with the app."""
    limits = settings.limits.check()
    active = [0]
    batcher = Batcher(model.run, max_batch=settings.max_batch,
                      max_wait_s=settings.max_wait_ms / 1000, max_queue=settings.max_queue,
                      arriving=lambda: active[0])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="vlp serve", version="1", lifespan=lifespan,
                  description=f"{model.family} model '{model.name}': {model.tasks()}")
    app.state.batcher, app.state.model = batcher, model

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return _error(error.status, error.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {error.errors()[:3]}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error ({type(error).__name__})")

    async def run(endpoint: str, key: Hashable, item: Any) -> Any:
        model.require(endpoint)
        try:
            return await asyncio.wait_for(batcher.submit(key, item), limits.timeout_s)
        except TimeoutError:
            raise RequestError(504, f"no result within {limits.timeout_s:g} s") from None
        except QueueFull as error:
            raise RequestError(503, f"server busy: {error}; retry later") from None
        except VlpError as error:  # the library refused the input (a prompt too long, ...)
            raise RequestError(400, str(error)) from None

    def decoding(fields: dict[str, Any], tokens: int, beams: int) -> tuple[int, int]:
        return (check_int(fields.get("max_new_tokens"), "max_new_tokens", tokens, 1,
                          limits.max_new_tokens),
                check_int(fields.get("num_beams"), "num_beams", beams, 1, limits.max_beams))

    errors = {400: {"model": schemas.ErrorResponse}, 401: {"model": schemas.ErrorResponse},
              413: {"model": schemas.ErrorResponse}, 415: {"model": schemas.ErrorResponse},
              422: {"model": schemas.ErrorResponse}}

    def post(path: str, body: type, response: type) -> Callable:
        return app.post(path, response_model=response, responses=errors,
                        openapi_extra=schemas.request_body(body))

    @post("/v1/embed/image", schemas.ImageRequest, schemas.EmbeddingResponse)
    async def embed_image(request: Request) -> Any:
        model.require("embed_image")
        _, image = await read_request(request, limits)
        return await run("embed_image", ("embed_image",), image)

    @post("/v1/embed/text", schemas.TextsRequest, schemas.EmbeddingsResponse)
    async def embed_text(request: Request) -> Any:
        model.require("embed_text")
        fields, _ = await read_request(request, limits, image=False)
        texts = check_texts(fields.get("texts"), "texts", limits.max_texts, limits)
        return await run("embed_text", ("embed_text",), texts)

    @post("/v1/zeroshot", schemas.ZeroshotRequest, schemas.ZeroshotResponse)
    async def zeroshot(request: Request) -> Any:
        model.require("zeroshot")
        fields, image = await read_request(request, limits)
        labels = check_texts(fields.get("labels"), "labels", limits.max_labels, limits)
        if len(set(labels)) != len(labels):
            raise RequestError(400, "'labels' has duplicates")
        templates = check_templates(fields.get("templates"), limits)
        return await run("zeroshot", ("zeroshot",),
                         (image, tuple(labels), tuple(templates) if templates else None))

    @post("/v1/caption", schemas.CaptionRequest, schemas.CaptionResponse)
    async def caption(request: Request) -> Any:
        model.require("caption")
        fields, image = await read_request(request, limits)
        tokens, beams = decoding(fields, 20, 3)
        prompt = fields.get("prompt") or None
        if prompt is not None:
            prompt = check_text(prompt, "prompt", limits)
        return await run("caption", ("caption", tokens, beams, prompt), image)

    @post("/v1/vqa", schemas.VqaRequest, schemas.VqaResponse)
    async def vqa(request: Request) -> Any:
        model.require("vqa")
        fields, image = await read_request(request, limits)
        question = check_text(fields.get("question"), "question", limits)
        tokens, beams = decoding(fields, 10, 3)
        return await run("vqa", ("vqa", tokens, beams), (image, question))

    @post("/v1/itm", schemas.ItmRequest, schemas.ItmResponse)
    async def itm(request: Request) -> Any:
        model.require("itm")
        fields, image = await read_request(request, limits)
        texts = check_texts(fields.get("texts"), "texts", limits.max_texts, limits)
        return await run("itm", ("itm",), (image, texts))

    @post("/v1/search", schemas.SearchRequest, schemas.SearchResponse)
    async def search(request: Request) -> Any:
        model.require("search")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields, _ = await read_request(request, limits, image=False)
        has_image = fields.get("image") not in (None, "")
        if (fields.get("text") not in (None, "")) == has_image:
            raise RequestError(400, "send exactly one of 'text' and 'image'")
        k = check_int(fields.get("k"), "k", 10, 1, limits.max_results)
        if not has_image:
            if model.tokenizer is None:
                raise RequestError(400, "text queries need the model's tokenizer, which its "
                                        "directory lacks; send an image")
            query: tuple[str, Any] = ("text", check_text(fields.get("text"), "text", limits))
        else:
            upload = fields["image"]
            data = (await upload.read() if kind == "multipart/form-data"
                    and isinstance(upload, UploadFile) else decode_base64(upload))
            check_image(data, limits)
            query = ("image", data)
        return await run("search", ("search", k), query)

    @app.get("/v1/search/thumbnail/{row}", include_in_schema=True,
             responses={404: {"model": schemas.ErrorResponse}})
    async def thumbnail(row: int) -> Response:
        model.require("search")
        if not 0 <= row < len(model.index):
            raise RequestError(404, f"row {row} is not in the index (0..{len(model.index) - 1})")
        try:
            data = await asyncio.to_thread(model.index.thumbnail, row)
        except VlpError as error:
            raise RequestError(404, str(error)) from None
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "family": model.family, "waiting": batcher.waiting,
                "batching": {"max_batch": settings.max_batch,
                             "max_wait_ms": settings.max_wait_ms, **batcher.stats.as_dict()}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": [model.describe()]}

    static = files("vlp.serve") / "static"

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(static / "index.html"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    app.add_middleware(GuardMiddleware, max_body_bytes=limits.max_body_bytes,
                       api_key=settings.api_key, active=active, timeout_s=limits.timeout_s)
    if settings.cors_origins:  # off by default; outermost, so its headers reach every answer
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app
