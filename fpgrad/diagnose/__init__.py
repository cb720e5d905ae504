"""Diagnosis: verdicts, the comparison, the diagnosis in words, the loss-scale advisor."""
