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
