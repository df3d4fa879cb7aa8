"""The package's layering (docs/architecture.md): no module imports a layer above its own, and a
function-level import says why it is not at the top of its module."""

from __future__ import annotations

import ast
from pathlib import Path

import moa_jax

PACKAGE = Path(moa_jax.__file__).parent

# Bottom to top; a module may import its own top-level package or one of a lower rank.
RANKS = {
    "errors": -2,  # below every layer: the user-error classes
    "domains": -1,  # the declared domains of option values, and the argument checks
    **dict.fromkeys(["files", "config", "sampling", "parallel"], 0),
    **dict.fromkeys(["downloads", "cli"], 1),
    **dict.fromkeys(["corpora", "runtime"], 2),
    "pallas_kernels": 3,
    "plan": 4,
    "models": 5,
    "methods": 6,
    "generate": 7,
    **dict.fromkeys(["search", "train"], 8),
    "eval": 9,
    **dict.fromkeys(["profile", "bench"], 10),
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel.parts[0].removesuffix(".py"), path, ast.parse(path.read_text())


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def _commented(lines: list[str], i: int) -> bool:
    """Whether line i (an import), the run of import lines around it, or the line above the
    run holds a comment."""
    j = i
    while (
        j > 0
        and (
            not lines[j - 1].strip()
            or lines[j - 1].lstrip().startswith(("import ", "from ", ")"))
            or lines[j - 1].startswith(" " * 8)  # a parenthesised import's names
            and "import" in "".join(lines[max(0, j - 8) : j])
        )
    ):
        j -= 1
    return any("#" in line for line in lines[max(0, j - 1) : i + 1])


def test_every_package_part_has_a_rank():
    parts = {top for top, _, _ in _modules()} - {"__init__"}
    assert parts <= set(RANKS), sorted(parts - set(RANKS))


def test_no_module_imports_a_layer_above_it():
    upward = []
    for top, path, tree in _modules():
        if top == "__init__":
            continue
        for node in ast.walk(tree):
            for name in _imported(node):
                parts = name.split(".")
                if parts[0] != "moa_jax" or len(parts) < 2 or parts[1] == top:
                    continue
                if RANKS[parts[1]] >= RANKS[top]:
                    upward.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {name}")
    assert not upward, "\n".join(upward)


def test_function_level_imports_say_why():
    silent = []
    for _, path, tree in _modules():
        lines = path.read_text().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            imports = sorted((n for n in ast.walk(fn) if _imported(n)), key=lambda n: n.lineno)
            # the first import of a function carries the reason for the function's imports
            if imports and not _commented(lines, imports[0].lineno - 1):
                silent.append(f"{path.relative_to(PACKAGE)}:{imports[0].lineno}")
    assert not silent, "function-level imports without a reason: " + ", ".join(silent)
