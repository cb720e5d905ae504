"""fpgrad: a floating-point precision lab for gradient underflow."""
