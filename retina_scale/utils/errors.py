"""The project's user-error type.

A :class:`UserError` is something the person running a command can fix (a bad value, a missing file, a
run folder holding other settings): ``retina-scale`` prints its message as one line and exits with
status 2. Every other exception is a bug and keeps its traceback. ``UserError`` is a ``ValueError``,
so code that catches ``ValueError`` around a check keeps working.
"""


class UserError(ValueError):
    """A problem with the user's input or files; the message names it and the accepted values."""
