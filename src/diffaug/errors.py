"""The one exception type for bad input, so callers and the CLI can tell it from bugs."""


class InputError(ValueError):
    """Bad input to diffaug: the message names the problem and the fix, in one line."""
