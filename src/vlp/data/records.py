"""`Record`: the one sample type every source yields and the loader consumes.

It lives on its own so that the map-style sources (`vlp.data.sources`), the WebDataset reader
(`vlp.data.webdataset`) and the loader all depend on it without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Record:
    """One sample: image path or encoded bytes, caption (None when absent), class index, key;
    a VQA sample's text is its question and ``answer`` its answer."""

    image: str | bytes
    text: str | None
    label: int | None
    key: str
    answer: str | None = None
