"""The one error type for user mistakes and unmet preconditions (bad data, config, package, search).

Entry points catch :class:`PneumoniaError` alone and print its message on one line (exit code 2); any other
exception is a bug and keeps its traceback.
"""


class PneumoniaError(Exception):
    """Something the user can fix: the message says what is wrong and what was expected."""
