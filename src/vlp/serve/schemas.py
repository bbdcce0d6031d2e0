"""Request and response bodies of `vlp serve`, for the OpenAPI page at ``/docs``.

The handlers read bodies themselves (JSON or multipart, `vlp.serve.app.read_request`) and check
them against `vlp.serve.limits`; these models only describe them.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

IMAGE = Field(description="the image file's bytes, base64-encoded (a data: URL is accepted); "
                          "in multipart, a file field named 'image'")


class ImageRequest(BaseModel):
    image: str = IMAGE


class TextsRequest(BaseModel):
    texts: list[str] = Field(description="texts to embed")


class ZeroshotRequest(BaseModel):
    image: str = IMAGE
    labels: list[str] = Field(description="class names, e.g. ['dog', 'cat']")
    templates: list[str] | None = Field(
        None, description="prompt templates with one '{}' (default: vlp's zero-shot templates)")


class CaptionRequest(BaseModel):
    image: str = IMAGE
    max_new_tokens: int = Field(20, description="longest caption in tokens")
    num_beams: int = Field(3, description="beam width (1: greedy)")
    prompt: str | None = Field(None, description="text the caption continues (not repeated)")


class VqaRequest(BaseModel):
    image: str = IMAGE
    question: str
    max_new_tokens: int = Field(10, description="longest answer in tokens")
    num_beams: int = Field(3, description="beam width (1: greedy)")


class ItmRequest(BaseModel):
    image: str = IMAGE
    texts: list[str] = Field(description="texts to match against the image")


class EmbeddingResponse(BaseModel):
    embedding: list = Field(description="L2-normalised (BLIP-2: one row per query)")


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]


class ZeroshotResponse(BaseModel):
    scores: dict[str, float] = Field(description="label -> probability (softmax of 100 x "
                                                 "cosine similarity)")
    similarities: dict[str, float] = Field(description="label -> cosine similarity")


class CaptionResponse(BaseModel):
    caption: str


class VqaResponse(BaseModel):
    answer: str


class ItmResponse(BaseModel):
    probabilities: list[float] = Field(description="match probability of each text")


class SearchRequest(BaseModel):
    text: str | None = Field(None, description="a text query (or send an image)")
    image: str | None = Field(None, description="an image query, base64 (or multipart 'image')")
    k: int = Field(10, description="results, best first")


class SearchResult(BaseModel):
    id: str
    score: float = Field(description="inner product of normalised embeddings (cosine)")
    path: str
    caption: str | None = None
    key: str | None = Field(None, description="the sample's key in its WebDataset shard")
    row: int
    thumbnail: str = Field(description="GET this for a JPEG of the result's image")


class SearchResponse(BaseModel):
    results: list[SearchResult]


class ErrorResponse(BaseModel):
    error: str


def request_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` documenting a body sent as JSON or as multipart."""
    schema = model.model_json_schema()
    form = {**schema, "properties": {**schema["properties"],
                                     "image": {"type": "string", "format": "binary"}}}
    if "image" not in schema["properties"]:
        form = schema
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": form}}}}
