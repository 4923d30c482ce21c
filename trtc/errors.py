"""The one exception type users see: a one-line message that names the problem and the fix."""


class TrtcError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""
