"""The one family of expected failures. `caictl.cli.main` turns each into one line on stderr."""


class CaictlError(Exception):
    """An expected failure: the message says what is wrong, where, and what to do."""

    exit_code = 1


class UsageError(CaictlError):
    """Bad input or bad options: exit 2."""

    exit_code = 2


class InputError(UsageError):
    """A bad record in an input file; the message names file:line."""
