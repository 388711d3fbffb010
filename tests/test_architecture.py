"""The layout rules of docs/architecture.md, checked from the source alone (``ast``; nothing is imported):
nothing under dreamr/ imports its harnesses (training, bench, tests), there is no import cycle at module
level, and every import between modules of dreamr/ goes to the same layer or a lower one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HARNESSES = ("training", "bench", "tests")

# docs/architecture.md, layers 4-11 (1-3 are C++); a module belongs to the first prefix it matches.
LAYERS = [
    (4, "python ops", ("dreamr._extension", "dreamr.ops", "dreamr.reference", "dreamr.scheduler")),
    (5, "model facts and text", ("dreamr.steps", "dreamr.answers", "dreamr.prompts", "dreamr.lm", "dreamr.models", "dreamr.early_exit",
                                 "dreamr.cache", "dreamr.multimodal", "dreamr.jsonl")),
    (6, "verification", ("dreamr.verify", "dreamr.heads")),
    (7, "settings, requests, results", ("dreamr.config", "dreamr.result", "dreamr.request", "dreamr.streaming")),
    (8, "token-level speculation", ("dreamr.sampling", "dreamr.speculation")),
    (9, "engines and backends", ("dreamr.engines", "dreamr.backends")),
    (10, "front", ("dreamr.reasoner", "dreamr.remote", "dreamr.__main__", "dreamr")),
    (11, "around it", ("dreamr.eval", "dreamr.calibrate", "dreamr.testing", "dreamr.serve")),
]


def layer_of(mod: str):
    for number, _, prefixes in LAYERS:
        if any(mod == p or mod.startswith(p + ".") for p in prefixes if p != "dreamr") or mod in prefixes:
            return number
    return None


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def top_level_imports(body):
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from top_level_imports(node.body)
            yield from top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from top_level_imports(block)


def targets(node, current: str, is_package: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = resolve(node, current, is_package)
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in modules else base)
    return out



def _graph():
    files = sorted((ROOT / "dreamr").rglob("*.py"))
    modules = {module_name(ROOT, f): f for f in files}
    names = set(modules)
    harness, upward, unmapped, edges = [], [], [], {m: set() for m in modules}
    for mod, f in modules.items():
        tree = ast.parse(f.read_text(), str(f))
        is_package = f.name == "__init__.py"
        type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and is_type_checking(block.test)
                     for stmt in block.body for n in ast.walk(stmt)}
        if layer_of(mod) is None:
            unmapped.append(mod)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in targets(node, mod, is_package, names):
                    if t.split(".")[0] in HARNESSES:
                        harness.append(f"{mod}:{node.lineno} imports {t}")
                    elif t in names and t != mod and id(node) not in type_only:
                        lo, hi = layer_of(mod), layer_of(t)
                        if lo is not None and hi is not None and hi > lo:
                            upward.append(f"{mod} (layer {lo}) imports {t} (layer {hi}), line {node.lineno}")
            elif isinstance(node, ast.Call):
                fn = node.func
                fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                    if str(node.args[0].value).split(".")[0] in HARNESSES:
                        harness.append(f"{mod}:{node.lineno} {fname}({node.args[0].value!r})")
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                harness.append(f"{mod}:{node.lineno} touches sys.path")
        for node in top_level_imports(tree.body):
            edges[mod].update(t for t in targets(node, mod, is_package, names) if t in names and t != mod)
    return harness, upward, unmapped, edges


def _cycles(edges):
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_every_module_has_a_layer_and_imports_only_downward():
    harness, upward, unmapped, _ = _graph()
    assert not unmapped, f"modules missing from LAYERS (add them, and to docs/architecture.md): {unmapped}"
    assert not harness, harness
    assert not upward, upward


def test_no_import_cycle_at_module_level():
    _, _, _, edges = _graph()
    assert _cycles(edges) == []


def test_the_checks_can_fail():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert layer_of("dreamr.engines.speculative") > layer_of("dreamr.speculation.writer") > layer_of("dreamr.cache")
    assert layer_of("dreamr.nonexistent") is None
