"""The error users see: one line, naming the problem and the fix."""


class InputError(ValueError):
    """Bad user input (a file, an option, data). The CLI prints it on one line and exits 2."""
