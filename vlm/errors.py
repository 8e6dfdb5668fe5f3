"""`UserError`: the mark of an error that its message alone lets a user fix (a bad key, a missing file, bad data).

Entry points print such an error as one line and exit with code 2, instead of a traceback. Each module raises its own
subclass (ConfigError, ShardError, ExportError, ...), so callers can still catch exactly what they expect.
"""


class UserError(Exception):
    """An error whose message names what is wrong and what would work."""
