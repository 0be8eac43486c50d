"""User-facing errors. The CLI prints their message on one line and exits with code 2."""

class ClmaeError(Exception):
    """Something the user can fix: bad data, a wrong option, an unreadable checkpoint."""

    exit_code = 2


class ConfigError(ClmaeError, ValueError):
    """An option has a value outside its allowed range. The message names the option."""


class DataError(ClmaeError):
    """A dataset could not be found or read."""


class CheckpointError(ClmaeError):
    """A checkpoint is missing, truncated, untrusted or does not match the model."""


class TrainingDiverged(ClmaeError):
    """Too many non-finite losses in a row; the last good state was saved."""
