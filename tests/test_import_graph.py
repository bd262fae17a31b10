"""The package's import graph has no circles, and its layers point one way (a newcomer can read it bottom-up).

Every `import`/`from ... import` of a `unitok_jax` module counts, at module level or inside a function: a function-
local import that closes a circle is still a circle, only hidden from Python's import-time check.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "unitok_jax"

# (lower package, higher package): nothing in the lower one may import the higher one.
LAYERS = [
    ("unitok_jax.models", "unitok_jax.convert"),
    ("unitok_jax.models", "unitok_jax.train"),
    ("unitok_jax.models", "unitok_jax.evals"),
    ("unitok_jax.evals", "unitok_jax.train"),
    ("unitok_jax.data", "unitok_jax.train"),
    ("unitok_jax.data", "unitok_jax.evals"),
    ("unitok_jax.data", "unitok_jax.models"),
]


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports}; `from pkg import name` counts as pkg.name when that is a module."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import unitok_jax.a.b` names a.b; a submodule's parent
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("unitok_jax"):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "unitok_jax.paths" in graph["unitok_jax.train.checkpointing"]
    assert "unitok_jax.evals.runner" in graph["unitok_jax.train.periodic_evals"]


def test_no_import_circles():
    graph = import_graph()
    # The package root re-exports nothing it imports from below, so edges into `unitok_jax` itself are not circles.
    graph = {m: {t for t in ts if t != "unitok_jax"} for m, ts in graph.items()}
    assert _cycles(graph) == []


@pytest.mark.parametrize("lower,higher", LAYERS)
def test_layers_point_one_way(lower, higher):
    offending = sorted(
        f"{m} -> {t}"
        for m, ts in import_graph().items()
        if m == lower or m.startswith(lower + ".")
        for t in ts
        if t == higher or t.startswith(higher + ".")
    )
    assert offending == []
