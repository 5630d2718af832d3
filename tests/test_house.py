"""The house stays simple: layers that import only downwards, no cycle, imports at the top, short chains,
no block of 6+ lines repeated. (The layering replaces the old 450-line cap: a cap measures size, and
splitting files to stay under it is what made the cycles.)"""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "afs_kit"
# each layer may import itself and the layers before it (docs/ARCHITECTURE.md draws them)
LAYERS = ["core", "config", "data", "models", "attacks", "train", "eval", "explain", "run", "studies", "app",
          "compat"]
TOP_LEVEL = {"errors": "core", "config": "config", "plots": "studies", "widgets": "studies", "__init__": "compat",
             "__main__": "compat"}
# the old import paths (README, notebooks, docs) kept for one release: each only re-exports a new home
SHIMS = {"analysis", "batches", "cli", "controls", "device", "evaluation", "pipeline", "stacking", "stats",
         "training"}
MAX_CHAIN = 8


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> str:
    parts = module.split(".")[1:]
    if len(parts) == 1 and (PACKAGE / parts[0]).is_dir():
        return parts[0]
    if len(parts) == 1:
        return "compat" if parts[0] in SHIMS else TOP_LEVEL[parts[0]]
    return parts[0]


def _imports(modules: dict[str, Path]) -> dict[str, list[tuple[str, bool]]]:
    """module -> [(kit module it imports, written inside a function)], skipping `if TYPE_CHECKING:`."""
    edges = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for n in ast.walk(node)}
        inner = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(node) if n is not node}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = []
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                hit = full if full in modules else target if target in modules else None
                if hit is None and f"{target}.__init__" in modules:
                    hit = f"{target}.__init__"
                if hit and hit != name:
                    found.append((hit, id(node) in inner))
        edges[name] = found
    return edges


def test_layers_import_only_downwards():
    modules = _modules()
    upward = [f"{a} -> {b}" for a, targets in _imports(modules).items() for b, _ in targets
              if LAYERS.index(_layer(b)) > LAYERS.index(_layer(a))]
    assert not upward, f"imports from a higher layer: {upward}"


def test_no_cycle_no_import_inside_a_function_and_short_chains():
    modules = _modules()
    edges = _imports(modules)
    inner = [f"{a} -> {b}" for a, targets in edges.items() for b, inside in targets if inside]
    assert not inner, f"kit imports written inside functions (only optional packages belong there): {inner}"
    graph = {a: {b.removesuffix(".__init__") for b, _ in targets} for a, targets in edges.items()}
    state, chain = {}, {}

    def depth(node, path):  # longest chain of modules from `node`, through packages' re-exports too
        if state.get(node) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path + [node])}")
        if node not in chain:
            state[node] = "open"
            links = [depth(b, path + [node]) for b in graph.get(node, ()) if b in graph]
            counts = not modules[node].name == "__init__.py"
            chain[node] = max(links, default=0) + counts
            state[node] = "done"
        return chain[node]

    longest = max(depth(m, []) for m in graph)
    assert longest <= MAX_CHAIN, f"the longest chain of kit modules has {longest} (at most {MAX_CHAIN})"


def test_old_import_paths_only_point_to_their_new_homes():
    for name in SHIMS:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert body and all(isinstance(n, ast.ImportFrom) for n in body), f"afs_kit/{name}.py is more than a shim"


def test_every_module_imports_and_exports_what_it_names():
    """Each module imports on its own, and every name in an `__all__` exists (a shim's `import *` needs them)."""
    missing = []
    for name in _modules():
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name.removesuffix(".__init__"))
        missing += [f"{name}.{n}" for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
    assert not missing, f"names in __all__ that do not exist: {missing}"


def test_no_block_of_six_lines_is_repeated():
    proc = subprocess.run([sys.executable, "-m", "pylint", "--disable=all", "--enable=duplicate-code",
                           "--min-similarity-lines=6", "--score=n", str(PACKAGE)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
