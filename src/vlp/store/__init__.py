"""Everything vlp writes to or reads from disk, below the model families: atomic files and
directories, strict tensor files, and the layout of model and run directories. It imports no
family, trainer or data code."""

from vlp.store.files import (
    atomic_directory,
    atomic_write,
    atomic_write_text,
    directory_lock,
    fsync_path,
    read_json_object,
    write_json,
)
from vlp.store.layout import (
    CONFIG_FILE,
    LATEST_LINK,
    TOKENIZER_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    checkpoint_dir,
    find_checkpoint,
    is_run_dir,
    list_checkpoints,
    model_dir,
    read_model_config,
    save_model_dir,
)
from vlp.store.tensors import (
    check_state,
    checked_weights,
    load_weights,
    read_safetensors,
    read_state_dict,
    write_safetensors,
)

__all__ = [
    "CONFIG_FILE", "LATEST_LINK", "TOKENIZER_FILE", "TRAIN_STATE_FILE", "WEIGHTS_FILE",
    "atomic_directory", "atomic_write", "atomic_write_text", "check_state", "checkpoint_dir",
    "checked_weights", "directory_lock", "find_checkpoint", "fsync_path", "is_run_dir",
    "list_checkpoints",
    "load_weights", "model_dir", "read_json_object", "read_model_config", "read_safetensors",
    "read_state_dict", "save_model_dir", "write_json", "write_safetensors",
]
