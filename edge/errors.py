"""One exception type for every problem a user can fix.

Commands catch ``UserError`` and print its message as one line (no traceback), so each
message names the thing that is wrong and what to do about it.
"""


class UserError(Exception):
    """A problem with input, configuration, files or the environment that the user can fix."""


class BundleError(UserError):
    """A model bundle that is missing, corrupt, or does not match its manifest."""


class DataError(UserError):
    """A dataset folder or image that cannot be used."""
