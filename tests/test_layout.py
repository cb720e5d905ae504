"""The package's shape: one folder per stage of the data flow, every import pointing down the
flow, no import cycle, and modules short or saying why they are not.

Every ``import`` and ``from ... import`` executed at run time counts, at any depth (a
function-level import is a cycle deferred, not removed); imports under ``if TYPE_CHECKING:``
are annotations only and do not count. ``from package import name`` counts as an import of
the submodule ``package.name`` when there is one, else of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "fpgrad"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def import_graph() -> nx.DiGraph:
    """Module -> modules it imports at run time (fpgrad's own only)."""
    mods = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t in mods and t != name)
    return graph


def test_import_graph_is_read() -> None:
    graph = import_graph()
    assert graph.has_edge("fpgrad.graph.precisions", "fpgrad.model.precision_names")
    assert graph.number_of_edges() > 100


def test_no_import_cycle() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


LONG = 500  #: lines above which a module says at its top why it is one module


def test_long_modules_say_why() -> None:
    """A module over LONG lines carries a "Long module:" paragraph in its docstring."""
    silent = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > LONG:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Long module:" not in doc:
                silent.append(f"{name} ({text.count(chr(10))} lines)")
    assert not silent, f"modules over {LONG} lines without a reason at the top: {silent}"


#: the stages, in the order data flows through them; a module may import its own stage and
#: those before it. ``top`` holds what drives everything (gallery scenarios, sweeps, the
#: watcher, the hostile-input campaign, the command line).
STAGES = ("base", "numbers", "arith", "model", "run", "reference", "graph", "diagnose",
          "training", "present", "top")  # fmt: skip
_BASE = {"fpgrad", "fpgrad.errors", "fpgrad.suggest", "fpgrad.progress", "fpgrad.jsonutil"}
#: the captured-graph path spans stages: its comparison and advice diagnose, its runs train
_GRAPH = {
    "fpgrad.graph.compare": "diagnose",
    "fpgrad.graph.advise": "diagnose",
    "fpgrad.graph.train": "training",
    "fpgrad.graph.train_runs": "training",
    "fpgrad.graph.train_exact": "training",
}
#: the only imports up the flow: a result's convenience methods that hand it to presentation
#: (``Comparison.render()``, ``TrainResult.render()`` and ``.plots()``), imported when called
_FACADES = {
    ("fpgrad.diagnose.result", "fpgrad.present.render"),
    ("fpgrad.training.result", "fpgrad.present.render"),
    ("fpgrad.training.result", "fpgrad.present.report.plots"),
}


def stage(module: str) -> str:
    if module in _BASE:
        return "base"
    if module in _GRAPH:
        return _GRAPH[module]
    part = module.split(".")[1]
    return part if part in STAGES else "top"


def test_every_import_points_down_the_flow() -> None:
    up = [
        f"{a} ({stage(a)}) -> {b} ({stage(b)})"
        for a, b in import_graph().edges()
        if STAGES.index(stage(a)) < STAGES.index(stage(b)) and (a, b) not in _FACADES
    ]
    assert not up, f"imports up the data flow: {up}"


def test_top_level_holds_only_the_stages_and_the_front() -> None:
    loose = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__", "__main__", "cli", "cli_guard", "errors", "jsonutil",
                     "progress", "suggest"]  # fmt: skip
