"""``model.pt2``: a ``torch.export.save``d program with its data named in a TOML file.

``fpgrad compare model.pt2`` reads ``model.toml`` beside it (``model.pt2:other.toml`` names
another)::

    inputs = ["x.npy"]              # the forward's arguments in order (.npy, or
                                    # "data.safetensors:key" for one tensor of a file)
    targets = "y.npy"
    loss = "cross_entropy"          # cross_entropy, nll, mse, l1, huber, bce_with_logits
    reduction = "mean"              # optional: "mean" (default) or "sum"
    label_smoothing = 0.0           # optional, cross_entropy only
    delta = 1.0                     # optional, huber only

The program is loaded with ``torch.export.load`` under a guard: every pickle it reads goes
through ``torch.load(weights_only=True)`` (tensors only), and the archive members torch would
unpickle without restriction (custom and opaque objects) are refused, so no arbitrary object is
ever unpickled. ``ExportedProgram.module()`` then runs as any model (:func:`from_module`).
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from fpgrad.errors import InputError
from fpgrad.graph.network import GraphNetwork, from_module
from fpgrad.model.validate import (
    MAX_ELEMENTS,
    MAX_FILE_BYTES,
    check_name,
    load_npy,
    load_toml,
    read_bytes,
    regular_file_size,
)

KEYS = {"inputs", "targets", "loss", "reduction", "label_smoothing", "delta", "name"}
LOSSES = ("cross_entropy", "nll", "mse", "l1", "huber", "bce_with_logits")


class _Refused(Exception):
    """An archive member torch would unpickle without restriction."""


def is_pt2(spec: str) -> bool:
    """Whether a command-line network argument names a ``.pt2`` program."""
    return spec.partition(":")[0].lower().endswith(".pt2")


@contextmanager
def _tensors_only() -> Any:
    """torch.load forced to ``weights_only=True``; pickle.loads and torch's object unpickler
    (custom/opaque constants of an archive) refuse."""
    import torch
    from torch.export.pt2_archive import _package

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _Refused("a pickled Python object (custom or opaque constant)")

    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with (
        mock.patch.object(torch, "load", load),
        mock.patch.object(_package.pickle, "loads", refuse),
        mock.patch.object(torch._C, "_pickle_load_obj", refuse),
    ):
        yield


def load_program(path: Path) -> Any:
    """``torch.export.load`` of ``path`` under :func:`_tensors_only`; one-line errors."""
    import pickle

    import torch

    regular_file_size(path, "torch.export program", MAX_FILE_BYTES)
    data = read_bytes(path, "torch.export program")
    if data[:2] != b"PK":
        raise InputError(f"{path}: not a torch.export.save archive (a .pt2 file is a zip); "
                         "save it with torch.export.save(torch.export.export(model, args), PATH)")  # fmt: skip
    check_archive(data, path)
    try:
        with _tensors_only(), _quiet():
            return torch.export.load(io.BytesIO(data))
    except _Refused as exc:
        raise InputError(f"{path}: the program holds {exc}; fpgrad never unpickles arbitrary "
                         "objects: export a model whose constants are tensors") from None  # fmt: skip
    except pickle.UnpicklingError as exc:
        from fpgrad.model.from_torch.model_file import refused_pickle

        found, detail = refused_pickle(exc)
        what = f"a pickled object ({found})" if found else f"not only tensors ({detail})"
        raise InputError(f"{path}: torch.load(weights_only=True) refused a member of the program: "
                         f"{what}; fpgrad never unpickles arbitrary objects") from None  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - anything torch cannot read is bad input
        raise InputError(f"{path}: not a torch.export.save program ({type(exc).__name__}: "
                         f"{_first_line(exc)})") from None  # fmt: skip


def check_archive(data: bytes, path: Path, depth: int = 0) -> None:
    """Refuse, before torch reads it, a zip whose members are compressed (a zip bomb:
    torch.export.save and torch.save store them), lie outside the file, or are named outside
    the archive (``..``, absolute); members that are zips themselves (torch.save files) alike."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise InputError(f"{path}: not a torch.export.save archive (a broken zip: "
                         f"{_first_line(exc)}); save it again with torch.export.save") from None  # fmt: skip
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise InputError(f"{path}: archive member {name!r} is named outside the archive; "
                             "fpgrad reads only archives written by torch.export.save")  # fmt: skip
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise InputError(f"{path}: archive member {name!r} is compressed ({info.file_size} "
                             "bytes declared); torch.export.save stores members uncompressed: "
                             "save it again with torch.export.save")  # fmt: skip
        if info.header_offset + info.compress_size > len(data):
            raise InputError(f"{path}: archive member {name!r} runs past the end of the file "
                             "(truncated); save it again with torch.export.save")  # fmt: skip
    if depth == 0:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in infos:
                if info.file_size >= 4:
                    with archive.open(info) as member:
                        if member.read(4) == b"PK\x03\x04":
                            check_archive(archive.read(info), path, 1)


@contextmanager
def _quiet() -> Any:
    """torch.export's loggers and Python warnings off while it loads: their lines on stderr
    (a traceback among them) would come before the one-line refusal."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in _LOGGERS]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, was in zip(loggers, before, strict=True):
            lg.disabled = was


_LOGGERS = ("torch.export", "torch.export.pt2_archive._package", "torch._export.serde.serialize")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _tensor(spec: Any, base: Path, where: str, what: str) -> Any:
    """One tensor from ``file.npy`` or ``file.safetensors:key`` (numpy arrays, never
    unpickled), as torch holds it (float dtypes and integers as stored)."""
    import torch

    if not isinstance(spec, str) or not spec:
        raise InputError(f'{where}: {what} must be a file name ("x.npy" or "d.safetensors:key")')
    name, _, key = spec.partition(":")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise InputError(f"{where}: {what}: {name!r} is outside the data file's directory; "
                         "put the data file beside it (or below) and name it relatively")  # fmt: skip
    path = base / name
    if name.lower().endswith(".npy"):
        if key:
            raise InputError(f"{where}: {what}: a .npy file holds one array; drop ':{key}'")
        arr = load_npy(path, where)
    elif name.lower().endswith(".safetensors"):
        if not key:
            raise InputError(f"{where}: {what}: name the tensor: {name}:KEY")
        regular_file_size(path, "data file", where=where)
        import torch
        from safetensors.torch import load

        try:  # torch's reader: bfloat16 and float8 tensors too (numpy has no such dtype)
            tensors = load(read_bytes(path, "data file", where=where))
        except Exception as exc:  # noqa: BLE001 - a malformed file is bad input
            raise InputError(
                f"{where}: {name}: not a safetensors file ({_first_line(exc)})"
            ) from None
        if key not in tensors:
            raise InputError(f"{where}: {name} has no tensor {key!r} "
                             f"(it has {', '.join(sorted(tensors)[:8]) or 'none'})")  # fmt: skip
        tensor = tensors[key]
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32,
                                                                torch.float64):  # fmt: skip
            tensor = tensor.to(torch.float64)  # exact: every narrow format widens exactly
        arr = tensor.numpy()
        if arr.size > MAX_ELEMENTS:
            raise InputError(f"{where}: {what}: {spec} holds {arr.size} numbers, above the limit "
                             f"of {MAX_ELEMENTS}; use less data")  # fmt: skip
    else:
        raise InputError(f"{where}: {what}: {name!r}: use a .npy or .safetensors file")
    if arr.dtype.kind not in "fiub" or arr.dtype.itemsize > 8:
        raise InputError(f"{where}: {what}: dtype {arr.dtype} is not a real or integer type")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{where}: {what} holds inf or NaN")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _loss(doc: dict[str, Any], where: str) -> Any:
    from torch import nn

    kind = doc.get("loss")
    if kind not in LOSSES:
        raise InputError(f"{where}: loss = {kind!r}: use one of {', '.join(LOSSES)}")
    reduction = doc.get("reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise InputError(f'{where}: reduction = {reduction!r}: use "mean" or "sum"')
    extra: dict[str, Any] = {}
    for key, owner in (("label_smoothing", "cross_entropy"), ("delta", "huber")):
        if key in doc:
            if kind != owner:
                raise InputError(f"{where}: {key} applies to loss = {owner!r} only")
            v = doc[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e300:
                raise InputError(f"{where}: {key} must be a non-negative number")
            extra[key] = float(v)
    make = {"cross_entropy": nn.CrossEntropyLoss, "nll": nn.NLLLoss, "mse": nn.MSELoss,
            "l1": nn.L1Loss, "huber": nn.HuberLoss, "bce_with_logits": nn.BCEWithLogitsLoss}  # fmt: skip
    return make[kind](reduction=reduction, **extra)


def load_pt2(spec: str) -> GraphNetwork:
    """``model.pt2`` (data in ``model.toml``) or ``model.pt2:data.toml``, captured."""
    name, _, toml = spec.partition(":")
    path = Path(name)
    data_path = Path(toml) if toml else path.with_suffix(".toml")
    if not path.exists() and not path.is_symlink():
        raise InputError(f"no such program: {name}; give model.pt2 saved by torch.export.save")
    regular_file_size(path, "torch.export program", MAX_FILE_BYTES)
    if not data_path.is_file():
        raise InputError(f"{name}: its data file {data_path} is missing: write inputs, targets "
                         'and loss there (inputs = ["x.npy"], targets = "y.npy", '
                         'loss = "cross_entropy"); see docs/howto/torch-models.md')  # fmt: skip
    where = str(data_path)
    doc = load_toml(data_path, "data file")
    unknown = set(doc) - KEYS
    if unknown:
        raise InputError(f"{where}: unknown key {sorted(unknown)[0]!r}; allowed: "
                         f"{', '.join(sorted(KEYS))}")  # fmt: skip
    for key in ("inputs", "targets", "loss"):
        if key not in doc:
            raise InputError(f"{where}: needs {key} (see docs/howto/torch-models.md)")
    files = doc["inputs"] if isinstance(doc["inputs"], list) else [doc["inputs"]]
    base = data_path.parent
    inputs = tuple(_tensor(f, base, where, f"inputs[{i}]") for i, f in enumerate(files))
    targets = _tensor(doc["targets"], base, where, "targets")
    loss = _loss(doc, where)
    program = load_program(path)
    try:
        model = program.module()
    except Exception as exc:  # noqa: BLE001 - a program torch cannot unlift is bad input
        raise InputError(f"{name}: torch cannot turn the program into a module "
                         f"({_first_line(exc)})") from None  # fmt: skip
    label = check_name(doc.get("name", path.stem), f"{data_path}: name")
    return from_module(model, inputs, targets, loss, name=label)
