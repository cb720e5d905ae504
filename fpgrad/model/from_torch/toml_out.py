"""The fpgrad network file (TOML) of an imported model: what ``fpgrad import`` writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.model.from_torch.modules import Imported


def _toml_value(v: Any, indent: str = "") -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):  # pragma: no cover - parse_network refuses these
            raise InputError(f"non-finite value {v} cannot be written")
        return repr(v)  # shortest repr: reads back to the same float64
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        if v and isinstance(v[0], list):
            inner = indent + "  "
            rows = ",\n".join(inner + _toml_value(r, inner) for r in v)
            return "[\n" + rows + ",\n" + indent + "]"
        return "[" + ", ".join(_toml_value(r, indent) for r in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")  # pragma: no cover


def network_toml(imported: Imported, data_files: tuple[str, str] | None = None) -> str:
    """The fpgrad network file of an imported model (weights written exactly). With
    ``data_files`` the data table names those files instead of holding the values."""
    net = imported.network
    lines = [
        f"# fpgrad network imported from a torch model ({net.name}); every number is exact",
        f"name = {json.dumps(net.name)}",
        "",
    ]
    for spec, layer in zip(imported.doc["layer"], net.layers, strict=True):
        origin = imported.origin[layer.name]
        lines.append("[[layer]]" + (f"  # torch: {origin}" if origin else ""))
        for k, v in spec.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    lines += ["[loss]", f"type = {json.dumps(net.loss.kind)}", "", "[data]"]
    if data_files:
        lines += [f"x_file = {json.dumps(data_files[0])}", f"y_file = {json.dumps(data_files[1])}"]
    else:
        lines += [f"x = {_toml_value(net.x.tolist())}", f"y = {_toml_value(net.y.tolist())}"]
    for pname, table in imported.doc.get("policy", {}).items():
        lines += ["", f"[policy.{json.dumps(pname)}]"]
        for k, v in table.items():
            if isinstance(v, dict):
                inner = ", ".join(f"{json.dumps(a)} = {json.dumps(b)}" for a, b in v.items())
                lines.append(f"{k} = {{ {inner} }}")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def write_network(imported: Imported, out: str | Path, data: str = "auto") -> list[str]:
    """Write ``out`` (a fpgrad TOML network file); data inline, or as ``.npy`` files beside it
    (``data="npy"``; ``"auto"``: files when the data holds more than 4096 numbers). Returns the
    paths written."""
    if data not in ("auto", "inline", "npy"):
        raise InputError(f"unknown data mode {data!r}; use auto, inline or npy")
    out = Path(out)
    net = imported.network
    use_files = data == "npy" or (data == "auto" and net.x.size + net.y.size > 4096)
    written = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        files = None
        if use_files:
            stem = out.name[: -len(out.suffix)] if out.suffix else out.name
            files = (f"{stem}.x.npy", f"{stem}.y.npy")
            np.save(out.parent / files[0], net.x)
            np.save(out.parent / files[1], net.y)
            written += [str(out.parent / f) for f in files]
        out.write_text(network_toml(imported, files))
    except OSError as exc:
        raise InputError(f"cannot write {str(out)!r}: {exc.strerror}") from None
    return [str(out), *written]

