"""`UserError`: the mark of an error that its message alone lets a user fix (a bad key, a missing file, bad data).

Entry points print such an error as one line and exit with code 2, instead of a traceback. Each module raises its own
subclass (ConfigError, ShardError, ExportError, ...), so callers can still catch exactly what they expect.
"""


class UserError(Exception):
    """An error whose message names what is wrong and what would work."""


def first_line(err: BaseException) -> str:
    """An exception as one short line for a message: its type, and the first sentence of its message's first line
    (library messages go on with advice that does not apply)."""
    message = str(err).strip()
    sentence = message.splitlines()[0].split(". ")[0][:200] if message else ""
    return f"{type(err).__name__}: {sentence}" if sentence else type(err).__name__


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages: null, boolean, number, string, list, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def is_text(text: str) -> bool:
    """Whether `text` has a UTF-8 form: no lone surrogate, as Python decodes bytes of another encoding (from argv,
    a terminal or a file read with surrogateescape) and as JSON's \\ud800-\\udfff escapes give."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
