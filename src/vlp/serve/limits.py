"""What `vlp serve` accepts from a client, checked before any work is queued.

Every refusal is a `RequestError` carrying its HTTP status and a one-line message; the app turns
it into ``{"error": message}``. Images are checked from their header only (format and declared
size), so a decompression bomb is refused before a single pixel is decoded; decoding itself
happens later on the inference input path (`vlp.data.images`), which reports a truncated or
corrupt file instead of raising. Clients send image bytes, never paths: nothing here opens a
file.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from vlp.errors import ConfigError

# PIL format names the server decodes; anything else (TIFF, EPS, PSD, ...) is refused with 415
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    """Bounds on one request (each is a `vlp serve` flag)."""

    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_text_chars: int = 1000
    max_texts: int = 64
    max_labels: int = 100
    max_templates: int = 16
    max_new_tokens: int = 64
    max_beams: int = 8
    max_results: int = 100  # /v1/search's k
    timeout_s: float = 60.0

    def check(self) -> Limits:
        for name, value in vars(self).items():
            if value <= 0:
                raise ConfigError(f"vlp serve: limit {name} must be > 0, got {value}")
        return self


def decode_base64(value: object, field: str = "image") -> bytes:
    """Bytes of a base64 string (a ``data:...;base64,`` URL prefix is allowed)."""
    if not isinstance(value, str) or not value:
        raise RequestError(400, f"'{field}' must be a non-empty base64 string of the image "
                                f"bytes (file paths and URLs are not accepted)")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if not head.endswith(";base64"):
            raise RequestError(400, f"'{field}': a data URL must be base64-encoded")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"'{field}' is not valid base64 (send the image file's bytes "
                                f"base64-encoded, or multipart with a file field 'image')"
                           ) from None


def check_image(data: bytes, limits: Limits) -> tuple[str, int, int]:
    """(format, width, height) read from the header of encoded image ``data``; `RequestError`
    415 for anything but an accepted image type, 413 for more pixels than ``limits`` allow."""
    if not data:
        raise RequestError(400, "the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as opened:
                kind, (width, height) = opened.format, opened.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RequestError(413, f"image too large to decode ({error}); this server accepts "
                                f"at most {limits.max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(415, f"not an image of an accepted type "
                                f"({', '.join(ACCEPTED_FORMATS)})") from None
    if width * height > limits.max_pixels:
        raise RequestError(413, f"image is {width}x{height} = {width * height} pixels; this "
                                f"server accepts at most {limits.max_pixels}")
    return kind, width, height


def check_text(value: object, field: str, limits: Limits) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(400, f"'{field}' must be a non-empty string")
    if len(value) > limits.max_text_chars:
        raise RequestError(400, f"'{field}' has {len(value)} characters; the limit is "
                                f"{limits.max_text_chars}")
    return value


def check_texts(values: object, field: str, limit: int, limits: Limits) -> list[str]:
    """A non-empty list of at most ``limit`` non-empty strings, each within the text length."""
    if not isinstance(values, list) or not values:
        raise RequestError(400, f"'{field}' must be a non-empty list of strings")
    if len(values) > limit:
        raise RequestError(400, f"'{field}' has {len(values)} entries; the limit is {limit}")
    return [check_text(value, f"{field}[{i}]", limits) for i, value in enumerate(values)]


def check_int(value: object, field: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    try:
        number = int(value) if isinstance(value, int | str) and not isinstance(value, bool) \
            else None
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise RequestError(400, f"'{field}' must be an integer in [{low}, {high}], got "
                                f"{value!r}")
    return number


def check_templates(values: object, limits: Limits) -> list[str] | None:
    """Zero-shot templates, each with exactly one '{}'; None keeps vlp's defaults."""
    if values is None:
        return None
    templates = check_texts(values, "templates", limits.max_templates, limits)
    for template in templates:
        if template.count("{}") != 1:
            raise RequestError(400, f"template {template!r}: needs exactly one '{{}}'")
    return templates
