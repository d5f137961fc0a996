"""What imports what, among the project's own modules.

The module graph of `pipeline/` and `jobs/`, read from the source with `ast` (imports at module level and inside
functions), has no cycle, no import that runs up or across the layers below, and no private name (`_name`)
taken from another package: a newcomer can read the packages bottom-up, and a package can change its private
parts without breaking another.

The driver and the CPU-only stages never import torch: only the scorers need it. Each process that imports
torch carries ~190 MB more resident memory and seconds more start-up; the driver and the tokenize/write actors
run once per CPU core on a cluster, so that is paid many times over.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("pipeline", "jobs")

# The layers, bottom first: a package imports only from packages of the layers below its own. Packages of one
# layer are independent of each other (the three consumers of the rerank job do not import each other).
LAYERS = (
    ("pipeline", "pipeline.core"),  # `pipeline` itself: the package's docstring only
    ("pipeline.runtime",),
    ("pipeline.model",),
    ("pipeline.rerank",),
    ("pipeline.datasets", "pipeline.quality", "pipeline.hard_negatives"),
    ("pipeline.benchmark",),
    ("jobs",),
)
# Modules that belong to a package other than their folder's: the rerank job's API under its earlier name.
PACKAGE_OF = {"pipeline.rerank_api": "pipeline.rerank"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "pipeline.rerank.job"
    target: str  # the imported module of ours (the nearest one the import names)
    name: str | None  # `from target import name` where name is not a module of ours, else None
    where: str  # "module", "function" (inside a def) or "typing" (under `if TYPE_CHECKING:`)
    path: str  # the importing file, relative to the root
    line: int

    def __str__(self) -> str:
        what = f" (`{self.name}`)" if self.name else ""
        inside = {"module": "", "function": ", inside a function", "typing": ", for typing only"}
        return (
            f"{self.source} -> {self.target}{what} at {self.path}:{self.line}{inside[self.where]}"
        )


def modules(root: Path = ROOT, top_level: tuple[str, ...] = TOP_LEVEL) -> dict[str, Path]:
    """{dotted module name: file} of every module under the top-level packages."""
    found = {}
    for top in top_level:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def package_of(module: str) -> str:
    """The package a module belongs to: `jobs`, or `pipeline.<first level>` (`pipeline` for the root)."""
    if module in PACKAGE_OF:
        return PACKAGE_OF[module]
    parts = module.split(".")
    return parts[0] if parts[0] == "jobs" else ".".join(parts[:2])


def imports(root: Path = ROOT, top_level: tuple[str, ...] = TOP_LEVEL) -> list[Import]:
    """Every import of one of our modules by another, wherever in the file it is written."""
    known = modules(root, top_level)

    def ours(name: str) -> str | None:  # the nearest module of ours a dotted name falls in
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found = []
    for source, path in known.items():
        rel = str(path.relative_to(root))
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]

        def visit(node: ast.AST, where: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(child, "function")
                elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    visit(child, "typing" if where == "module" else where)
                elif isinstance(child, ast.Import):
                    for alias in child.names:
                        if target := ours(alias.name):
                            found.append(Import(source, target, None, where, rel, child.lineno))
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:  # relative: from the importing module's package up
                        anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join([*anchor, *([base] if base else [])])
                    for alias in child.names:
                        if f"{base}.{alias.name}" in known:
                            target, name = f"{base}.{alias.name}", None
                        else:
                            target, name = ours(base), alias.name
                        if target:
                            found.append(Import(source, target, name, where, rel, child.lineno))
                else:
                    visit(child, where)

        visit(ast.parse(path.read_text(), filename=rel), "module")
    return found


def private_attributes(root: Path = ROOT, top_level: tuple[str, ...] = TOP_LEVEL) -> list[Import]:
    """`module._name` read through a module of ours imported under a name (`import a.b as m; m._x`,
    `from a import b; b._x`, `import a.b; a.b._x`): a private name taken without a `from` import."""
    known = modules(root, top_level)
    found = []
    for source, path in known.items():
        rel = str(path.relative_to(root))
        tree = ast.parse(path.read_text(), filename=rel)
        bound = {}  # local name -> module of ours
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known:
                        bound[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in known:
                        bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                holder = ast.unparse(node.value)
                target = bound.get(holder) or (holder if holder in known else None)
                if target:
                    found.append(Import(source, target, node.attr, "module", rel, node.lineno))
    return found


@functools.cache
def project_imports() -> tuple[list[Import], list[Import]]:
    """This project's imports (`imports`), and its private attributes read through modules (`private_attributes`),
    read once for the tests below."""
    return imports(), private_attributes()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layer_of(package: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if package in layer), None)


def unlayered(known: dict[str, Path]) -> list[str]:
    """Modules whose package has no place in `LAYERS`."""
    return sorted(m for m in known if layer_of(package_of(m)) is None)


def crossing(found: list[Import]) -> list[Import]:
    """Imports from a package of the same layer or of a layer above the importer's."""
    bad = []
    for edge in found:
        source, target = package_of(edge.source), package_of(edge.target)
        if source != target and not layer_of(source) > layer_of(target):
            bad.append(edge)
    return bad


def private_across(found: list[Import]) -> list[Import]:
    """Private names (or private modules) taken from another package."""
    return [
        edge
        for edge in found
        if package_of(edge.source) != package_of(edge.target)
        and (
            (edge.name is not None and _private(edge.name))
            or any(_private(part) for part in edge.target.split("."))
        )
    ]


def cycles(found: list[Import], wheres: tuple[str, ...]) -> list[list[Import]]:
    """One shortest cycle, as its edges, in each strongly connected part of the graph of the imports made
    at `wheres` ("module", "function")."""
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for edge in found:
        if edge.where in wheres and edge.source != edge.target:
            edges[edge.source].setdefault(edge.target, edge)
    reported, result = set(), []
    for start in sorted(edges):
        if start in reported:
            continue
        # breadth first from `start`: the shortest way back to it, if any
        came_from: dict[str, Import] = {}
        queue = deque([start])
        while queue and start not in came_from:
            node = queue.popleft()
            for target, edge in sorted(edges[node].items()):
                if target not in came_from:
                    came_from[target] = edge
                    queue.append(target)
        if start not in came_from:
            continue
        path, node = [], start
        while True:
            edge = came_from[node]
            path.append(edge)
            node = edge.source
            if node == start:
                break
        path.reverse()
        reported.update(edge.source for edge in path)
        result.append(path)
    return result


def _lines(edges: list[Import]) -> str:
    return "\n  " + "\n  ".join(str(edge) for edge in edges)


def _cycle_lines(found: list[list[Import]]) -> str:
    return "".join(f"\n cycle:{_lines(cycle)}" for cycle in found)


def test_every_module_has_a_layer():
    missing = unlayered(modules())
    assert not missing, f"modules whose package is missing from LAYERS in {__file__}: {missing}"


def test_no_cycle_among_module_level_imports():
    found = cycles(project_imports()[0], ("module",))
    assert not found, f"modules that import each other when loaded:{_cycle_lines(found)}"


def test_no_cycle_closed_by_an_import_inside_a_function():
    """An import moved into a function to dodge a cycle still ties the two modules together: each needs the
    other to work. The shared piece moves down instead."""
    found = cycles(project_imports()[0], ("module", "function"))
    assert not found, (
        f"modules that import each other (one of the imports inside a function):{_cycle_lines(found)}"
    )


def test_no_package_imports_from_its_own_layer_or_above():
    bad = crossing(project_imports()[0])
    layers = " < ".join("{" + ", ".join(layer) + "}" for layer in LAYERS)
    assert not bad, f"imports against the layers ({layers}):{_lines(bad)}"


def test_no_private_name_is_taken_from_another_package():
    found, attributes = project_imports()
    bad = private_across(found) + private_across(attributes)
    assert not bad, f"private names taken from another package:{_lines(bad)}"


def test_the_checks_find_each_kind_of_bad_import(tmp_path):
    """The checks above on a made-up tree holding one of each fault, so a clean graph is no accident."""
    files = {
        "pipeline/__init__.py": "",
        "pipeline/core/__init__.py": "",
        "pipeline/core/a.py": "from pipeline.core import b\n",
        "pipeline/core/b.py": "import pipeline.core.a\n",  # a module-level cycle
        "pipeline/core/c.py": "def f():\n    from pipeline.rerank.job import run\n",  # upward
        "pipeline/rerank/__init__.py": "",
        "pipeline/rerank/job.py": (
            "from pipeline.core import c\nfrom pipeline.model.w import _hidden\n"  # cycle via a function
            "import pipeline.model.w as w\nx = w._also_hidden\n"
        ),
        "pipeline/model/__init__.py": "",
        "pipeline/model/w.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import jobs.x\n",
        "jobs/__init__.py": "",
        "jobs/x.py": "from pipeline.rerank import job\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = imports(tmp_path)
    pairs = lambda edges: sorted((e.source, e.target) for e in edges)  # noqa: E731
    assert [pairs(c) for c in cycles(found, ("module",))] == [
        [("pipeline.core.a", "pipeline.core.b"), ("pipeline.core.b", "pipeline.core.a")]
    ]
    assert [pairs(c) for c in cycles(found, ("module", "function"))] == [
        [("pipeline.core.a", "pipeline.core.b"), ("pipeline.core.b", "pipeline.core.a")],
        [("pipeline.core.c", "pipeline.rerank.job"), ("pipeline.rerank.job", "pipeline.core.c")],
    ]
    assert pairs(crossing(found)) == [
        ("pipeline.core.c", "pipeline.rerank.job"),
        ("pipeline.model.w", "jobs.x"),
    ]
    private = private_across(found) + private_across(private_attributes(tmp_path))
    assert sorted((e.source, e.name) for e in private) == [
        ("pipeline.rerank.job", "_also_hidden"),
        ("pipeline.rerank.job", "_hidden"),
    ]
    assert "pipeline/core/c.py:2, inside a function" in str(crossing(found)[0])
    assert unlayered({"pipeline.extra.y": tmp_path, "jobs.z": tmp_path}) == ["pipeline.extra.y"]


TORCH_FREE = [
    "pipeline.core.dtypes",
    "jobs.rerank",
    "jobs.hard_negatives",
    "jobs.index_quality",
    "pipeline.rerank.api",
    "pipeline.rerank.compose",
    "pipeline.rerank.stages.score",
    "pipeline.rerank.stages.read",
    "pipeline.rerank.stages.tokenize",
    "pipeline.rerank.stages.lookup",
    "pipeline.rerank.stages.rank",
    "pipeline.rerank.stages.write",
    "pipeline.model.checkpoint",
    "pipeline.model.tokenization",
]


def test_the_driver_and_the_cpu_stages_do_not_import_torch():
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {TORCH_FREE!r}]; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_engine_names_still_load_from_the_package():
    code = (
        "import pipeline.model as m, sys; assert 'torch' not in sys.modules; "
        "print(m.CrossEncoder.__module__, m.ModelConfig.__module__, m.Int8Options.__name__,"
        " 'torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [
        "pipeline.model.cross_encoder",
        "pipeline.model.model_config",
        "Int8Options",
        "True",
    ]


def test_loading_and_scoring_do_not_import_torch_dynamo(tmp_path):
    """Building the model on the meta device skips its random initialisation: on meta, torch.nn.init runs
    through torch._refs, whose first call imports torch._dynamo (seconds of every scorer actor's start)."""
    from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

    directory = build_checkpoint(str(tmp_path / "tiny"), ARCHITECTURES["tiny"])
    code = (
        "import sys; from pipeline.model import CrossEncoder; "
        f"m = CrossEncoder.from_pretrained({directory!r}); s = m.compute_score([('q', 'a passage')] * 3); "
        "assert len(s) == 3 and abs(s[0] - s[2]) < 1e-5; "
        "print(next(m.model.parameters()).device, 'torch._dynamo' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The weights are the checkpoint's, on the CPU (not left on meta), and dynamo was never imported.
    assert result.stdout.split() == ["cpu", "False"]
