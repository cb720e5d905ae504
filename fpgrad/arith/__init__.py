"""Number systems: one small interface (:class:`~fpgrad.arith.base.Arith`), several implementations.

``mp``: mpmath at N bits (the exact reference, certified by :mod:`fpgrad.exact`).
Native torch dtypes are evaluated by :mod:`fpgrad.torch_native` with real autograd instead.
"""
