"""The house rules of the package layout (issue 11): imports form a DAG, only the MPI
gateway imports mpi4py, and no module grows past a size a newcomer can read."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mpicellpose"
MAX_LINES = 520  # "about 500"


def modules() -> dict:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        tree = ast.parse(path.read_text())
        script = set()  # the `if __name__ == "__main__":` part runs as a script, not on import
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                script |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in script:
                continue
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                cands = [mod + "." + a.name for a in node.names]
                if node.module:
                    cands.append(mod)
                deps |= {c for c in cands if c in mods and c != name}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods and a.name != name}
        # importing a submodule runs its package's __init__: count parents, except one's own
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def test_imports_form_a_dag():
    graph = import_graph()
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif not state.get(v):
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if not state.get(u):
            visit(u, [])
    assert not cycles, cycles


def test_only_the_gateway_imports_mpi4py():
    users = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mpi4py"):
                users.append(name)
            elif isinstance(node, ast.Import) and any(a.name.startswith("mpi4py") for a in node.names):
                users.append(name)
    assert sorted(set(users)) == ["mpicellpose.comm"] or all(u.startswith("mpicellpose.comm") for u in users), users


def test_no_module_too_long():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}
