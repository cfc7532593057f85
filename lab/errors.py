"""The one exception type the CLI turns into a short message instead of a traceback."""


class LabError(Exception):
    """A problem the user can fix: the message names the problem and the fix."""
