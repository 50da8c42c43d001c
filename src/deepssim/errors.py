"""The one exception type for problems the user can fix (bad input, bad options).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class DeepSSIMError(ValueError):
    """A user-facing error: the message names the file or option and says what to do."""
