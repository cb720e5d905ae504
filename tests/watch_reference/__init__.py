"""The watch statistics as they were before the fast paths of the watchfast branch (commit
acdab95, fpgrad/watching/classify.py, optimizer.py, exact_fallback.py verbatim but for imports):
tests/test_watch_golden.py runs watched training with these in place of the package's and
requires identical records."""
