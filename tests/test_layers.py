"""The package layout is the design card's: lower layers never import higher ones, and no two modules
import each other, directly or around a circle. Every import counts, including those inside functions
(a lazy import still ties the two modules together)."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lower numbers are lower layers; a module may import its own layer and the ones below. cache/ and
# models/ are side by side at the bottom and must not import each other.
LAYERS = {"cache": 0, "models": 0, "pipeline.common": 1, "pipeline.extract": 2, "pipeline.distill": 3,
          "pipeline.evaluate": 4, "pipeline.demo": 5}
PACKAGES = ("cache", "models", "pipeline")
# Stages that meet only in the cache and in common/: distill reads what extract wrote, never its code.
# (Evaluation does import extract: it decodes its labelled videos through stage one.)
APART = [("pipeline.distill", "pipeline.extract")]


def module_files():
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    yield module.removesuffix(".__init__"), path


def project_imports(module, path, known):
    """The project modules `module` imports (resolved to the longest known module name)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                base = ".".join(module.split(".")[:-node.level] + [node.module])
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                if ".".join(parts[:k]) in known:
                    found.add(".".join(parts[:k]))
                    break
    found.discard(module)
    return found


def layer_of(module):
    match = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return match, LAYERS.get(match)


def import_graph():
    files = dict(module_files())
    # a package's __init__ is a module too, but importing `pipeline.extract.decode` does not make
    # `pipeline.extract` an import of interest beyond its layer
    return {m: project_imports(m, p, set(files)) for m, p in files.items()}


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_belongs_to_a_layer():
    assert [m for m in import_graph() if layer_of(m)[1] is None and m != "pipeline"] == []


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, imports in import_graph().items():
        name, level = layer_of(module)
        for target in imports:
            target_name, target_level = layer_of(target)
            if target_level is None or module == "pipeline":
                continue
            if target_level > level or (target_level == level and target_name != name):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_stages_that_meet_only_in_the_cache_import_nothing_of_each_other():
    crossing = [f"{module} -> {target}" for module, imports in import_graph().items() for target in imports
                for low, high in APART
                for a, b in ((low, high), (high, low))
                if layer_of(module)[0] == a and layer_of(target)[0] == b]
    assert crossing == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert cycles(graph) == expected


def test_an_upward_import_is_named(tmp_path, monkeypatch):
    # the check itself: a cache module importing pipeline would be reported
    fake = {"cache.reader": {"pipeline.common.config"}, "pipeline.common.config": set()}
    monkeypatch.setattr(__import__(__name__), "import_graph", lambda: fake)
    with pytest.raises(AssertionError, match="cache.reader -> pipeline.common.config"):
        test_no_module_imports_a_higher_layer()


def test_a_crossing_between_stages_is_named(monkeypatch):
    fake = {"pipeline.distill.teachers": {"pipeline.extract.teachers"}, "pipeline.extract.teachers": set()}
    monkeypatch.setattr(__import__(__name__), "import_graph", lambda: fake)
    with pytest.raises(AssertionError, match="pipeline.distill.teachers -> pipeline.extract.teachers"):
        test_stages_that_meet_only_in_the_cache_import_nothing_of_each_other()
