"""Evaluation through ``encode_image`` / ``encode_text``: zero-shot, retrieval, embeddings."""

from vlp.eval.embed import (
    ImageEmbeddings,
    embed_images,
    embed_texts,
    load_embeddings,
    save_embeddings,
)
from vlp.eval.retrieval import retrieval_eval, retrieval_metrics
from vlp.eval.zeroshot import topk_accuracy, zero_shot_classifier, zeroshot_eval

__all__ = [
    "ImageEmbeddings",
    "embed_images",
    "embed_texts",
    "load_embeddings",
    "retrieval_eval",
    "retrieval_metrics",
    "save_embeddings",
    "topk_accuracy",
    "zero_shot_classifier",
    "zeroshot_eval",
]
