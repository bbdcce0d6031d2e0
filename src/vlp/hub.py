"""Pretrained models by name: ``hf-hub:ORG/REPO[@REVISION]`` and ``open_clip:ARCH/TAG``.

A name resolves to a Hugging Face Hub snapshot through ``huggingface_hub`` (the ``hub`` extra),
which keeps its own cache and honours ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE``. The
snapshot's files say its format: a transformers ``config.json`` (CLIP, SigLIP, BLIP, BLIP-2,
GPT-2), an open_clip ``open_clip_config.json`` or a vlp model directory. A foreign snapshot is
converted once (`vlp.interop`) into a vlp model directory in vlp's cache (``VLP_CACHE``, default
``~/.cache/vlp``), keyed by repo, resolved commit and a fingerprint of the snapshot's files,
written atomically and reused on the next load; a changed snapshot gets a new entry.

``open_clip:ARCH/TAG`` maps open_clip's pretrained tags to their hub repos (needs open_clip).
A local directory of the same name always wins: nothing is resolved over the network then.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp.errors import CheckpointError, ConfigError
from vlp.interop import load_any
from vlp.store import CONFIG_FILE, atomic_directory, read_json_object, write_json
from vlp.store.layout import write_model_files

HF_PREFIX, OPEN_CLIP_PREFIX = "hf-hub:", "open_clip:"
SOURCE_FILE = "pretrained.json"  # beside a converted model: where it came from
OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_MODEL_TYPES = ("clip", "siglip", "blip", "blip-2", "gpt2")  # transformers configs vlp converts
# what a snapshot needs; weights as .bin only where a repo has no safetensors
DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
FALLBACK_PATTERNS = ["*.bin"]


@dataclass(frozen=True)
class Pretrained:
    """A name vlp knows (`list_pretrained`): what it is and where its weights come from."""

    name: str
    family: str
    preset: str | None  # the vlp preset of the same architecture (its parameter count) ...
    source: str
    parts: tuple[tuple[str, Any], ...] = ()  # ... with the parts the checkpoint holds

    def parameters(self) -> int | None:
        return preset_parameters(self.preset, dict(self.parts)) if self.preset else None


# BLIP checkpoints hold one task's parts, without momentum encoders (as vlp imports them)
_CAPTIONER = (("text_encoder", False), ("retrieval_heads", False), ("queue_size", 0))
_VQA = (("retrieval_heads", False), ("queue_size", 0))
_RETRIEVAL = (("text_decoder", False), ("queue_size", 0))


PRETRAINED = (
    Pretrained("hf-hub:openai/clip-vit-base-patch32", "clip", "clip-vit-b-32",
               "OpenAI CLIP ViT-B/32 (transformers)"),
    Pretrained("hf-hub:openai/clip-vit-base-patch16", "clip", "clip-vit-b-16",
               "OpenAI CLIP ViT-B/16 (transformers)"),
    Pretrained("hf-hub:openai/clip-vit-large-patch14", "clip", "clip-vit-l-14",
               "OpenAI CLIP ViT-L/14 (transformers)"),
    Pretrained("open_clip:ViT-B-32/laion2b_s34b_b79k", "clip", "clip-vit-b-32",
               "LAION-2B open_clip ViT-B/32 (open_clip)"),
    Pretrained("open_clip:ViT-B-16-SigLIP/webli", "clip", None,
               "SigLIP ViT-B/16, WebLI (open_clip, timm image tower)"),
    Pretrained("hf-hub:Salesforce/blip-image-captioning-base", "blip", "blip-vit-b-16",
               "BLIP captioning, ViT-B (transformers)", _CAPTIONER),
    Pretrained("hf-hub:Salesforce/blip-image-captioning-large", "blip", "blip-vit-l-16",
               "BLIP captioning, ViT-L (transformers)", _CAPTIONER),
    Pretrained("hf-hub:Salesforce/blip-vqa-base", "blip", "blip-vit-b-16",
               "BLIP VQA, ViT-B (transformers)", _VQA),
    Pretrained("hf-hub:Salesforce/blip-itm-base-coco", "blip", "blip-vit-b-16",
               "BLIP retrieval (ITC + ITM), ViT-B, COCO (transformers)", _RETRIEVAL),
    Pretrained("hf-hub:Salesforce/blip2-opt-2.7b", "blip2", None,
               "BLIP-2 with OPT-2.7b (transformers)"),
    Pretrained("hf-hub:openai-community/gpt2", "lm", "gpt2", "GPT-2 small (transformers)"),
)


def list_pretrained() -> list[Pretrained]:
    """The names vlp knows. Any other ``hf-hub:`` repo in a format vlp reads loads too."""
    return list(PRETRAINED)


def preset_parameters(preset: str, overrides: dict[str, Any] | None = None) -> int | None:
    """Parameters of a preset's model (with ``overrides``), counted on the meta device (no
    memory, no files); None for presets whose parts are read from elsewhere (BLIP-2's frozen
    encoder and LLM)."""
    import torch

    from vlp.config import config_to_dict
    from vlp.factory import model_config
    from vlp.models import build_model

    config = model_config(preset, overrides)
    fields = config_to_dict(config)
    if fields.get("llm_path") or fields.get("vision_path"):
        return None
    with torch.device("meta"):
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())


def is_pretrained_name(name: str | os.PathLike[str]) -> bool:
    """A hub name (not a local path: a directory of that name on disk wins)."""
    text = str(name)
    return text.startswith((HF_PREFIX, OPEN_CLIP_PREFIX)) and not Path(text).exists()


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A local vlp model (or run) directory for ``name_or_path``: a path as it is, a hub name
    through its snapshot, converted into vlp's cache when it is not a vlp directory."""
    if not is_pretrained_name(name_or_path):
        return Path(name_or_path)
    name = str(name_or_path)
    repo, revision = _repo_and_revision(name)
    snapshot, commit = _snapshot(name, repo, revision)
    fmt = snapshot_format(snapshot, name)
    if fmt == "vlp":
        return snapshot
    entry = (cache_dir() / "pretrained" / repo.replace("/", "--")
             / f"{commit}-{fingerprint(snapshot)}")
    if (entry / SOURCE_FILE).is_file():
        return entry  # converted before from this very snapshot
    imported = load_any(snapshot, fmt)
    model = imported.model
    with atomic_directory(entry) as staging:
        write_model_files(staging, model.config, model.state_dict(), imported.tokenizer)
        write_json(staging / SOURCE_FILE, {"name": name, "repo": repo, "revision": revision,
                                           "commit": commit, "format": fmt})
    return entry


def cache_dir() -> Path:
    """vlp's cache: ``VLP_CACHE``, else ``$XDG_CACHE_HOME/vlp``, else ``~/.cache/vlp``."""
    if os.environ.get("VLP_CACHE"):
        return Path(os.environ["VLP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlp"


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps snapshots: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "huggingface")
    return Path(home) / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _repo_and_revision(name: str) -> tuple[str, str | None]:
    if name.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_repo(name[len(OPEN_CLIP_PREFIX):]), None
    spec = name[len(HF_PREFIX):]
    repo, _, revision = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"{name}: expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION")
    return repo, revision or None


def _open_clip_repo(spec: str) -> str:
    arch, _, tag = spec.partition("/")
    if not arch or not tag:
        raise ConfigError(f"open_clip:{spec}: expected open_clip:ARCH/TAG, e.g. "
                          "open_clip:ViT-B-32/laion2b_s34b_b79k")
    try:
        import open_clip
    except ImportError as error:
        raise ConfigError(f"open_clip:{spec}: open_clip names need open_clip_torch "
                          "(pip install 'vlp[interop]'); or use hf-hub:ORG/REPO") from error
    config = open_clip.get_pretrained_cfg(arch, tag) or {}
    repo = str(config.get("hf_hub") or "").strip("/")
    if not repo:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ConfigError(f"open_clip:{spec}: no hub repo for this tag (tags of {arch}: "
                          f"{known})")
    return repo


def _snapshot(name: str, repo: str, revision: str | None) -> tuple[Path, str]:
    """The snapshot directory of ``repo`` at ``revision`` and its commit hash."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as error:
        raise ConfigError(f"{name}: hub names need huggingface_hub (pip install "
                          "'vlp[hub]')") from error
    cache = hf_cache_dir()
    options: dict[str, Any] = {"repo_id": repo, "revision": revision, "cache_dir": cache,
                               "local_files_only": _offline()}
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        path = Path(snapshot_download(allow_patterns=DOWNLOAD_PATTERNS, **options))
        if not _weights_present(path) and not options["local_files_only"]:
            path = Path(snapshot_download(allow_patterns=FALLBACK_PATTERNS, **options))
    except LocalEntryNotFoundError as error:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
        raise CheckpointError(f"{name}: not in the local hub cache {cache} and {why}; fetch "
                              f"it with `{fetch}` (cache: HF_HUB_CACHE / HF_HOME)") from error
    except Exception as error:  # the hub's own errors: unknown repo, revision, access
        raise CheckpointError(f"{name}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from error
    return path, path.name


def _weights_present(snapshot: Path) -> bool:
    return any(p.suffix in {".safetensors", ".bin"} or p.name.endswith(".safetensors.index.json")
               for p in snapshot.iterdir())


def snapshot_format(snapshot: Path, name: str) -> str:
    """"vlp", "hf" or "open_clip", from the snapshot's files."""
    config_path = snapshot / CONFIG_FILE
    if config_path.is_file():
        config = read_json_object(config_path, CheckpointError)
        if "family" in config:
            return "vlp"
        if config.get("model_type") in HF_MODEL_TYPES:
            return "hf"
        if (snapshot / OPEN_CLIP_CONFIG).is_file():
            return "open_clip"
        raise CheckpointError(f"{name}: {config_path} declares model_type "
                              f"{config.get('model_type')!r}; vlp converts "
                              f"{list(HF_MODEL_TYPES)} (transformers) and open_clip models")
    if (snapshot / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    files = sorted(p.name for p in snapshot.iterdir())
    raise CheckpointError(f"{name}: snapshot {snapshot} holds neither {CONFIG_FILE} nor "
                          f"{OPEN_CLIP_CONFIG} (files: {files})")


def fingerprint(snapshot: Path) -> str:
    """12 hex digits that change when any file of the snapshot does: a blob's name (the hub
    cache links each file to a content-addressed blob), else size and modification time."""
    digest = hashlib.sha256()
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        identity = (os.readlink(path) if path.is_symlink()
                    else f"{path.stat().st_size}:{path.stat().st_mtime_ns}")
        digest.update(f"{path.relative_to(snapshot)}\0{identity}\n".encode())
    return digest.hexdigest()[:12]
