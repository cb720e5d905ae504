"""Reports of a user's own model (``own``: compare, advise, train; ``captured``: captured
models) and their parts (``markdown``, ``plots``, ``outdir``): Markdown and self-contained
HTML. They read results only; the gallery's index is :mod:`fpgrad.scenarios.gallery`."""
