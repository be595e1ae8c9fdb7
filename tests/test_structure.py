"""The package's shape: imports run one way between the layers (DESIGN.md), no import cycle (counting imports
inside functions), and no folder, module or function past the size that keeps it readable."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lcmtrt"
# each layer and the layers it may import; the contract modules (bundle, errors, limits) are open to all
ALLOWED = {
    "contract": set(),
    "export": {"contract"},
    "backends": {"contract"},
    "runtime": {"contract", "backends"},
    "engines": {"contract", "export", "runtime", "backends"},
    "serve": {"contract", "runtime", "backends"},
    "bench": {"contract", "runtime", "backends", "export"},  # the diffusers and optimum peers load checkpoints
    "cli": {"contract", "runtime", "backends", "export", "engines", "serve", "bench"},
    "configs": set(),
}
MAX_MODULES, MAX_MODULE_LINES, MAX_FUNCTION_LINES = 12, 500, 80


def _modules() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("bundle", "errors", "limits"):
        return "contract"
    if parts[1:3] == ["runtime", "backends"]:
        return "backends"  # its own layer: the runtime drives the backends, never the other way
    return parts[1]


def test_layers_import_one_way() -> None:
    wrong = [f"{a} imports {b}" for a, targets in _graph().items() for b in sorted(targets)
             if _layer(b) != _layer(a) and _layer(b) not in ALLOWED[_layer(a)]]
    assert not wrong, wrong


def test_no_import_cycle() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_the_cycle_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from lcmtrt_x import b\n")
    assert _imports(tmp_path / "a.py", "lcmtrt_x.a", {"lcmtrt_x.a", "lcmtrt_x.b"}) == {"lcmtrt_x.b"}


def test_sizes() -> None:
    too_big = []
    for folder in {p.parent for p in PACKAGE.rglob("*.py")}:
        count = len([p for p in folder.glob("*.py") if p.name != "__init__.py"])
        if count > MAX_MODULES:
            too_big.append(f"{folder.relative_to(PACKAGE.parent)}: {count} modules")
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        where = path.relative_to(PACKAGE.parent)
        if text.count("\n") > MAX_MODULE_LINES:
            too_big.append(f"{where}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    assert not too_big, too_big


def test_no_top_level_folder_mapping() -> None:
    """Every subpackage is an ordinary folder of lcmtrt/: nothing is mapped in from elsewhere."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    assert "package-dir" not in text
    for old in ("export", "engines", "runtime", "configs"):
        assert not (PACKAGE.parent / old).exists(), f"top-level {old}/ is back"
