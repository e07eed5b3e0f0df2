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

# Floors, lowest first: a module may import its own floor's modules and those below, never
# one above (docs/architecture.md draws the same picture). Every module must be listed.
LAYERS = [
    ("base", {"jsonfile", "threads", "sysinfo", "plots", "data", "ops", "ops._backends", "ops.lora_meta",
              "ops.linear", "ops.lora_linear", "ops.pool", "adapters", "fingerprint", "gguf_import",
              "model_store", "tokenizer", "kv_cache", "synthetic"}),
    ("model", {"attention", "model"}),
    ("engine", {"step", "generation", "runtime"}),
    ("index/rag", {"index", "rag"}),
    ("train/eval", {"train", "train.sampling", "train.checkpoint", "train.init", "train.loop", "train.pretrain",
                    "train.generator", "train.retriever", "train.mine", "evaluation"}),
    ("commands", {"cli_args", "train.cli", "eval_command", "server", "server.app", "server.command", "server.engine",
                  "server.errors", "server.metrics", "server.schemas", "demo", "demo.pipeline",
                  "demo.tokenizer_train", "demo.user_data", "demo.worthbuying", "bench", "bench_worker", "cli"}),
    ("package", {""}),  # bsharedrag_fast/__init__.py: the public names
]


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
    floor = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
    unplaced = sorted(set(graph) - set(floor))
    assert not unplaced, f"modules missing from LAYERS: {unplaced}"
    upward = [f"{a} ({LAYERS[floor[a]][0]}) imports {b} ({LAYERS[floor[b]][0]})"
              for a in sorted(graph) for b in sorted(graph[a]) if floor[b] > floor[a]]
    assert not upward, "imports that point up: " + "; ".join(upward)


def test_the_checker_sees_a_circle():
    """The checker itself: a planted circle and a lazy import are found."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    modules = _modules()
    assert "model" in _imports("runtime", modules["runtime"], modules)  # a lazy import inside a method
