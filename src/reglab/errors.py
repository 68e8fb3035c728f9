"""Errors a user can fix. scripts/ print them as one line and exit non-zero; anything else is a bug."""


class ReglabError(Exception):
    """Base of user-facing errors: the message names the key or file and says what to do."""


class ConfigError(ReglabError, ValueError):
    """A config value is invalid; the message starts with the dotted key."""


class DataError(ReglabError):
    """A dataset is missing, corrupted or cannot be downloaded."""


class DivergenceError(ReglabError):
    """The training loss became NaN or infinite."""


class CheckpointError(ReglabError):
    """A checkpoint cannot be used: damaged, or written by another model."""
