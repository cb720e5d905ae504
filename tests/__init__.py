"""fpgrad's test suite (a package, so that ``tests.oracle`` imports under plain ``pytest`` too)."""
