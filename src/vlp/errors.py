"""User-facing errors: each names the file or field at fault and what was expected."""

from __future__ import annotations

from typing import Any


class VlpError(Exception):
    """Base class for every error vlp raises on bad input; the CLI prints it as one line."""


class ConfigError(VlpError):
    """A preset, config field or option has a value vlp cannot use."""


class DataError(VlpError):
    """A data file, column, image or caption is missing or malformed."""


class CheckpointError(VlpError):
    """A checkpoint directory or file is missing, corrupt or does not match the model."""


def require_extra(module: str, extra: str, purpose: str) -> Any:
    """The optional module `module` (dotted names import their parents too), or a ConfigError
    saying that `purpose` needs it and which extra installs it."""
    import importlib

    parts = module.split(".")
    try:
        for depth in range(1, len(parts) + 1):  # the package first, as an import statement does
            found = importlib.import_module(".".join(parts[:depth]))
        return found
    except ImportError as error:
        raise ConfigError(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                          f"pip install 'vlp[{extra}]'") from error


def one_line(error: BaseException) -> str:
    """`error`'s message on one line, as the command line prints it."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def print_error(error: BaseException, debug: bool = False) -> None:
    """How the command line shows a VlpError: one line on stderr, after its traceback when
    `debug` or VLP_DEBUG is set (and not "0")."""
    import os
    import sys
    import traceback

    if debug or os.environ.get("VLP_DEBUG", "") not in ("", "0"):
        traceback.print_exception(error)
    print(f"vlp: error: {one_line(error)}", file=sys.stderr)
