"""An independent oracle for fpgrad's exact reference (issue 12's adversarial campaign).

:mod:`tests.oracle.reference` evaluates a :class:`fpgrad.model.network.Network` from the mathematics
(exact rationals where the computation is rational, mpmath at a high adaptive precision
elsewhere, checked by agreement with a second run 2,000 bits higher); :mod:`tests.oracle.claims`
reads what fpgrad's :class:`~fpgrad.reference.exact.ExactResult` claims and checks each claim against it;
:mod:`tests.oracle.generate` draws adversarial networks. Nothing here imports fpgrad's arithmetic.
"""
