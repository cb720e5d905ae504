"""A campaign of hostile and broken inputs through the command line, in this process.

:func:`cases` draws deterministic cases from a seed: mutated network files, data files
(.npy, .csv), model files with their state dicts, and hostile option values. :func:`run_case`
writes a case's files, calls :func:`fpgrad.cli.main` under a time limit and a memory limit, and
judges the outcome by the exit-code contract: exit 0, or exit 2 with one line
``fpgrad: error: ...``; never exit 1, a hang, memory exhaustion, or a message that quotes the
content of a file the user did not name (a canary planted in every data file).
"""

from fpgrad.fuzz.cases import CANARY, Case, cases
from fpgrad.fuzz.judge import CaseTimeout, Outcome, limits, run_case
from fpgrad.fuzz.known import known_cases

__all__ = ["CANARY", "Case", "CaseTimeout", "Outcome", "cases", "known_cases", "limits", "run_case"]
