"""Search over an image (or text) collection: `vlp embed` → `vlp index` → `vlp search`.

- `vlp.search.embed`: a collection embedded in resumable parts (one per WebDataset shard or run
  of images), locally, per rank under torchrun, or on Ray Data actors; Parquet metadata.
- `vlp.search.index`: a faiss index over the parts (flat, ivf-pq, hnsw), tuned on held-out
  queries to a recall@10 target.
- `vlp.search.searcher`: `Index`, the built index loaded for queries by vectors, texts or
  images (also behind `vlp serve --index`'s ``/v1/search``).

faiss and pyarrow (the ``faiss`` extra) and Ray (the ``ray`` extra) are imported only when used.
"""

from vlp.search.embed import EmbedConfig, embed_collection
from vlp.search.index import IndexConfig, build_index
from vlp.search.searcher import Index

__all__ = ["EmbedConfig", "Index", "IndexConfig", "build_index", "embed_collection"]
