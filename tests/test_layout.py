"""The shape of src/prunepilot: no import cycles (function-level imports included), short functions, model files
in their own layer, and block roles decided in engine/ alone."""
import ast
import re
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


# ---------------------------------------------------------------------------------------------- layers

BELOW_THE_LOADER = ("prunepilot.job", "prunepilot.eval", "prunepilot.engine", "prunepilot.methods",
                    "prunepilot.structured")


def reachable(graph: dict[str, set[str]], mod: str) -> set[str]:
    seen, todo = set(), [mod]
    while todo:
        for v in graph[todo.pop()] - seen:
            seen.add(v)
            todo.append(v)
    return seen


def in_package(mod: str, packages) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


def test_model_files_are_their_own_layer():
    """job, eval, engine, methods and structured never reach the loader (prunepilot.modeling), even through other
    modules; report.py, job.py and export/ save and load through modeling, never the structured widths format."""
    graph = import_graph()
    up = [m for m in graph if in_package(m, BELOW_THE_LOADER) and "prunepilot.modeling" in reachable(graph, m)]
    assert up == []
    direct = [m for m in graph if in_package(m, ("prunepilot.report", "prunepilot.job", "prunepilot.export"))
              and "prunepilot.structured.saving" in graph[m]]
    assert direct == []


# The module names of a block's roles (engine/layout.py), GPT-2's Conv1D type name (engine/adapter.py).
ROLE_NAME = re.compile(r"(?:^|\.)(?:q|k|v|o|out|qkv|gate|up|down|gate_up)_proj(?:\.|$)|^fc[12]$|^Conv1D$")


def role_names(tree: ast.AST) -> list[str]:
    """String constants that name a block role, leaving out docstrings and the attribute named by
    ExpertMatrix(module, attr, e) (a fused expert parameter, engine/moe.py)."""
    skip = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    skip |= {id(n.args[1]) for n in ast.walk(tree) if isinstance(n, ast.Call) and len(n.args) > 1
             and getattr(n.func, "id", getattr(n.func, "attr", None)) == "ExpertMatrix"}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in skip and ROLE_NAME.search(n.value)]


def test_only_the_engine_decides_block_roles():
    """Which module of a block is the MLP, attention or an expert is answered in engine/ alone: no other module
    tests module names (q_proj, down_proj, fc1 ...) or the Conv1D type name."""
    found = {mod: role_names(ast.parse(path.read_text())) for mod, path in modules().items()
             if not in_package(mod, ("prunepilot.engine",))}
    assert {mod: names for mod, names in found.items() if names} == {}


def test_the_role_checker_sees_a_name_test():
    tree = ast.parse('def width(block):\n    """Read from q_proj (a docstring may say so)."""\n'
                     '    q = [m for n, m in block.named_modules() if n.endswith("q_proj")]\n'
                     '    return q, ExpertMatrix(block.mlp.experts, "down_proj", 0), type(q).__name__ == "Conv1D"\n')
    assert sorted(role_names(tree)) == ["Conv1D", "q_proj"]


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
