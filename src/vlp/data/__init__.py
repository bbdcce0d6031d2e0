"""Data: sources over on-disk formats, image transforms, and the resumable loader.

`vlp.data.synthetic` (the built-in dataset) is imported on its own, to keep this import light.
"""

from vlp.data.images import (
    ImageBatch,
    ImageDataset,
    ImageGroups,
    collate_images,
    group_images,
    image_batches,
    images_in_directory,
    open_image,
)
from vlp.data.loader import Loader, make_loader
from vlp.data.pipeline import SKIP_REASONS, derive_seed
from vlp.data.records import Record
from vlp.data.shardio import expand_braces, expand_urls
from vlp.data.sources import (
    SOURCE_KINDS,
    CocoSource,
    CsvSource,
    ImageFolderSource,
    JsonlSource,
    ListSource,
    MapSource,
    build_source,
    infer_source_kind,
)
from vlp.data.transforms import ImageTransform, image_transform, random_resized_crop_box
from vlp.data.webdataset import WebDatasetSource

__all__ = [
    "SKIP_REASONS",
    "SOURCE_KINDS",
    "CocoSource",
    "CsvSource",
    "ImageBatch",
    "ImageDataset",
    "ImageFolderSource",
    "ImageGroups",
    "ImageTransform",
    "JsonlSource",
    "ListSource",
    "Loader",
    "MapSource",
    "Record",
    "WebDatasetSource",
    "build_source",
    "collate_images",
    "derive_seed",
    "expand_braces",
    "expand_urls",
    "group_images",
    "image_batches",
    "image_transform",
    "images_in_directory",
    "infer_source_kind",
    "make_loader",
    "open_image",
    "random_resized_crop_box",
]
