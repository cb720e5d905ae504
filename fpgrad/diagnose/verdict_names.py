"""The verdict names, in table order: one list for every reader (numpy-free, so that building
the command line imports no numpy)."""

VERDICTS = (
    "ok",
    "structural_zero",
    "rounding_zero",
    "subnormal",
    "overflow",
    "nan",
    "wrong_sign",
    "spurious_nonzero",
    "inaccurate",
    "undetermined",
)
