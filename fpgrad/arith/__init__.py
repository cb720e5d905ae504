"""Number systems: one small interface (:class:`~fpgrad.arith.base.Arith`), several implementations.

``mp``: mpmath at N bits (the definitional exact reference, certified by :mod:`fpgrad.reference.exact`
with a second evaluation at 2N bits).
``ball``: the fast exact reference: balls with multi-word midpoints and rigorous float64
radii, numpy plus compiled numba kernels (``jit_*``), built from ``expansion`` (double- and
triple-double kernels), ``elementary`` (exp, expm1, log, tanh, sigmoid on expansions) and ``ozaki``
(error-free matrix products by float64 slices).
Native torch dtypes are evaluated by :mod:`fpgrad.run.torch_native` with real autograd instead.
"""
