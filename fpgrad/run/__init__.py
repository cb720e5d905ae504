"""Runs: a network evaluated in a number system, in torch, under a precision policy; optimizers and loss scaling."""
