"""The one exception type for bad input, so callers and the CLI can tell it from bugs."""


class InputError(ValueError):
    """Bad input to diffaug: the message names the problem and the fix, in one line."""


class StorageError(OSError):
    """A write failed for lack of space (or quota): the message names the file and says the old one is intact."""
