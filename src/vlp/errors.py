"""User-facing errors: each names the file or field at fault and what was expected."""


class VlpError(Exception):
    """Base class for every error vlp raises on bad input; the CLI prints it as one line."""


class ConfigError(VlpError):
    """A preset, config field or option has a value vlp cannot use."""


class DataError(VlpError):
    """A data file, column, image or caption is missing or malformed."""


class CheckpointError(VlpError):
    """A checkpoint directory or file is missing, corrupt or does not match the model."""


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
