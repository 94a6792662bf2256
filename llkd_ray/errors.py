"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""


class LlkdError(Exception):
    """A problem with the user's input (file, column, config, model path), not a bug."""


class ConfigError(LlkdError, ValueError):
    """The configuration is invalid; the message names the key and what is allowed."""


class DataError(LlkdError):
    """The corpus or gold set cannot be used as given."""
