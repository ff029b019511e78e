"""The one exception type that means "the user gave us something wrong"."""


class BdguardError(Exception):
    """Bad input: a wrong path, an unknown name, a bad value, a corrupt or foreign file.

    The CLI turns it into one line on stderr and exit code 2; library callers can catch it.
    """
