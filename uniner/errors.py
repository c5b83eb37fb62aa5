"""The one error type a user sees: a single line naming the problem and the fix."""


class UserError(Exception):
    """Bad input, settings or environment. The CLI prints the message as one line and exits with status 2."""
