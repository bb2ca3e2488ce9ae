"""The shape of src/prunepilot: no import cycles (function-level imports included) and short functions."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "prunepilot").rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported(mod: str, path: Path, node, known) -> set[str]:
    """The project modules an import statement names (`from .x import y` may name module x.y)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
    target = ".".join(base + ([node.module] if node.module else []))
    return {t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in known and t != mod}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {mod: set().union(*[imported(mod, path, n, known) for n in ast.walk(ast.parse(path.read_text()))
                               if isinstance(n, (ast.Import, ast.ImportFrom))])
            for mod, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
    return cycles


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "prunepilot"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    graph = import_graph()
    assert graph["prunepilot.a"] == {"prunepilot.b"} and "prunepilot.a" in graph["prunepilot.b"]
    assert find_cycles(graph) == [["prunepilot.a", "prunepilot.b", "prunepilot.a"]]


def test_functions_are_short():
    long = []
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{mod}.{node.name}: {n} lines")
    assert long == []


def test_bench_scripts_do_not_import_from_tests():
    """Model builders and fixtures-as-code shared with bench/ live in prunepilot.testing: no bench script imports a
    module of tests/ or puts tests/ on sys.path."""
    bench, tests = SRC.parent / "bench", SRC.parent / "tests"
    test_modules = {"tests", "conftest"} | {f.stem for f in tests.glob("*.py")}
    found = []
    for script in sorted(bench.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = ["tests"] if node.value.strip("/") == "tests" else []  # REPO / "tests" on sys.path
            else:
                continue
            found += [f"{script.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in test_modules]
    assert found == []


def test_the_library_does_not_import_prunepilot_testing():
    """prunepilot.testing (tiny models, hostile files, a llama.cpp server) is for tests and bench/ only."""
    graph = import_graph()
    assert [m for m, deps in graph.items() if not m.startswith("prunepilot.testing")
            and any(d.startswith("prunepilot.testing") for d in deps)] == []
    assert graph["prunepilot.testing"] == set()  # importing the package imports none of its modules


def test_test_files_are_short():
    """One subject per test file: none over 500 lines (fakes several files share go into a helper module)."""
    long = {f.name: n for f in (SRC.parent / "tests").glob("*.py") if (n := len(f.read_text().splitlines())) > 500}
    assert long == {}
