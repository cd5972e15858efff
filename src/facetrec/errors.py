"""Errors that tell the user what went wrong and what to do. Library code raises; only the CLI exits."""


class FacetrecError(ValueError):
    """Base class: a problem with the user's input, config or files (not a bug)."""


class ConfigError(FacetrecError):
    """A config file or `--set` override is wrong."""


class DataError(FacetrecError):
    """A raw data file is missing, empty or malformed."""
