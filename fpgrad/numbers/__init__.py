"""Numbers: formats, correct rounding in every mode, exact decimal strings."""
