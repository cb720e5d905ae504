"""``path/to/script.py:build``: a Python file whose function returns (model, inputs, targets,
loss); a module-level ``POLICIES`` dict (name -> table as a network file's ``[policy.NAME]``,
``layers`` keyed by module path) adds the model's own precision policies. The file is user code and runs as pytest runs test files: imported as a module, its
directory first on ``sys.path``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from fpgrad.errors import InputError
from fpgrad.graph.network import GraphNetwork, from_module


def is_script(spec: str) -> bool:
    """Whether a command-line network argument names a captured model: a Python build script
    or a ``.pt2`` program (:mod:`fpgrad.graph.pt2`)."""
    from fpgrad.graph.pt2 import is_pt2

    path = spec.rsplit(":", 1)[0] if ":" in spec else spec
    return path.endswith(".py") or is_pt2(spec)


def load_script(spec: str, seed: int | None = None) -> GraphNetwork:
    """Run ``build()`` (or the function after the colon) of the script and capture its model;
    a ``.pt2`` program is loaded with its data file instead. ``seed``: called as
    ``build(seed=seed)`` (a build without a ``seed`` parameter is refused)."""
    from fpgrad.graph.pt2 import is_pt2, load_pt2

    if is_pt2(spec):
        if seed is not None:
            raise InputError(f"{spec}: a .pt2 program has no build(seed) to re-draw; drop the seed")
        return load_pt2(spec)
    path_s, _, func = spec.partition(":") if spec.count(":") else (spec, "", "")
    func = func or "build"
    path = Path(path_s)
    if not path.is_file():
        raise InputError(f"no such script: {path_s}; give path/to/script.py:build")
    name = f"fpgrad_user_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"{path_s} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
        build = getattr(module, func, None)
        if not callable(build):
            raise InputError(f"{path_s} defines no function {func}(); it must return "
                             "(model, inputs, targets, loss)")  # fmt: skip
        if seed is not None and not takes_seed(build):
            raise InputError(f"{path_s}:{func} takes no seed argument; define "
                             f"{func}(seed=0) to vary it, or drop the seed")  # fmt: skip
        built = build() if seed is None else build(seed=seed)
        policies = getattr(module, "POLICIES", None)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code failed: say where, one line
        raise InputError(
            f"{path_s}:{func} raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return from_module(
        *_unpack(built, f"{path_s}:{func}"), name=Path(path_s).stem, policies=policies
    )


def takes_seed(fn: Any) -> bool:
    """Whether ``fn`` can be called as ``fn(seed=...)``."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "seed" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _unpack(built: Any, where: str) -> tuple[Any, Any, Any, Any]:
    if not isinstance(built, tuple) or len(built) != 4:
        raise InputError(f"{where} must return a tuple (model, inputs, targets, loss)")
    return built  # type: ignore[return-value]
