"""Errors caused by user input; the CLIs print them as one line, without a traceback."""


class UserError(ValueError):
    """Bad input: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """An invalid setting."""


class DataError(UserError):
    """Data that is missing, unreadable or not in the expected layout."""
