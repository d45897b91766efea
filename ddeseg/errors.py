"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class DDESegError(Exception):
    """Bad input a user can fix (a path, a file, a config value). The message says what and where."""


class DataError(DDESegError):
    """A raw dataset or shard that cannot be read as expected."""


class CheckpointError(DDESegError):
    """A checkpoint that does not fit the model (no matching keys, wrong shapes, wrong format)."""
