"""The error users see: one line, naming the problem and the fix."""


class InputError(ValueError):
    """Bad user input (a file, an option, data). The CLI prints it on one line and exits 2."""


#: fpgrad's on/off environment variables (docs/reference/environment.md)
SWITCHES = ("FPGRAD_INT8_GEMM", "FPGRAD_ARB_KERNELS", "FPGRAD_ROUNDING_KERNEL")
_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


def switch(name: str) -> bool | None:
    """The on/off environment variable ``name``: True, False, or None when unset or empty;
    any other value is an :class:`InputError` naming the variable and the values it takes."""
    import os

    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return None
    if value in _ON or value in _OFF:
        return value in _ON
    raise InputError(
        f"environment variable {name}={raw!r} is neither on nor off: set it to 1 or 0 "
        "(or unset it; see docs/reference/environment.md)"
    )
