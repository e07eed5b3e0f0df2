"""The package's import graph: no circles, and imports point one way through the layers.

Read from the source with ast (nothing is imported): every `import` / `from ... import`
in a module, lazy ones inside functions included (they run too, only later), except those
under `if TYPE_CHECKING:`. `from .pkg import name` is an edge to the module pkg.name when
that is a module, else to pkg (its __init__).
"""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bsharedrag_fast")
PKG = "bsharedrag_fast"
BUILT = {"_C", "kernels"}  # installed into the package by setup.py (the C++ extension, the Triton kernels)

# The layers are the package's folders, lowest first: a module may import its own layer's
# modules and those below, never one above (docs/architecture.md draws the same picture).
LAYERS = [
    ("util", "ops"),
    ("model",),
    ("engine",),
    ("index", "rag"),
    ("train", "eval"),
    ("cli", "server", "demo", "bench"),
    ("",),  # bsharedrag_fast/__init__.py: the public names
]


def _floor(module: str) -> int:
    folder = module.split(".")[0]  # a module beside __init__.py is its own "folder": in no layer
    for i, folders in enumerate(LAYERS):
        if folder in folders:
            return i
    raise AssertionError(f"{module!r} is not in a layer folder: move it into one of {LAYERS}")


def _modules() -> dict[str, str]:
    """Dotted name under the package ('' for its __init__) -> file."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix("__init__").rstrip(".")] = os.path.join(d, f)
    return out


def _type_checking_nodes(tree: ast.AST) -> set:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports(name: str, path: str, modules: dict) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    skip = _type_checking_nodes(tree)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    found.add(a.name[len(PKG) + 1:])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PKG or node.module.startswith(PKG + ".")):
                target = node.module[len(PKG) + 1:]
            else:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}" if target else a.name
                if sub not in BUILT:
                    found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    circles = _circles(_graph())
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_imports_point_down_the_layers():
    graph = _graph()
    floor = {m: _floor(m) for m in graph}
    upward = [f"{a} imports {b} (a higher layer)" for a in sorted(graph) for b in sorted(graph[a]) if floor[b] > floor[a]]
    assert not upward, "imports that point up: " + "; ".join(upward)


def test_the_checker_sees_a_circle():
    """The checker itself: a planted circle and a lazy import are found."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    modules = _modules()
    assert "model.backbone" in _imports("engine.runtime", modules["engine.runtime"], modules)  # a lazy import


def test_help_loads_no_torch():
    """`bsharedrag --help` and every command's --help build their parsers without importing
    torch (it takes seconds): the package's public names, the training options and the bench
    presets load lazily. In a fresh interpreter, as the console script runs."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from bsharedrag_fast.cli.main import main\n"
        "for argv in ([], ['demo'], ['train', 'retriever'], ['train', 'generator'], ['eval', 'retrieval'],\n"
        "             ['bench'], ['serve'], ['index'], ['ask'], ['import-gguf'], ['mine-negatives']):\n"
        "    try:\n"
        "        main(argv + ['--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "    assert 'torch' not in sys.modules, f'{argv}: --help imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: bsharedrag" in proc.stdout
