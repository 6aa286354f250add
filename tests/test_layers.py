"""The package's import graph, read from the source with `ast` (README, "How the code is laid out"):
every import goes down the layer order (or within a layer) and never round a circle, and the real
loading and forward path imports no toy model."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_sft", "make_dpo_pairs", "train_dpo", "mine_hard", "train_hard", "train_ppo", "evaluate",
           "merge_lora"]
# bottom to top; a module may import from its own layer or any layer below
LAYERS = [
    ["files", "data", "pairs", "losses", "rewards", "synth", "seeds"],  # no model: data, losses, rewards, files
    ["internvl", "qwenvl", "tiny", "tiny_qwenvl"],  # the families, and the toy models as their stand-ins
    ["sa2va", "lora"],  # loading a model and a stage checkpoint, LoRA
    ["forward", "video"],  # batch -> mask logits, frozen-feature cache, video memory
    ["engine"],  # processes, the optimisation engine, resume points, run log
    ["cli", "evaluation", "baselines", "frames", "tiny_pretrain"],  # what several stages share
    SCRIPTS,
]
TOYS = {"tiny", "tiny_qwenvl"}
TOY_TOOLS = {"tiny_pretrain"}  # builds the toy's shipped weights: a toy itself
REAL_PATH = ["sa2va", "lora", "forward", "video"]  # loading a released folder, and the forward path


def path_of(name):
    return os.path.join(ROOT, f"{name}.py") if name in SCRIPTS else os.path.join(ROOT, "common", f"{name}.py")


def imports(name):
    """{module of common/ this one imports: True when at module level, False when only inside a function}."""
    tree = ast.parse(open(path_of(name)).read())
    top = {id(node) for node in tree.body}
    found = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == "common":
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("common."):
            names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("common.")]
        for n in names:
            found[n] = found.get(n, False) or id(node) in top
    return found


MODULES = [m for layer in LAYERS for m in layer]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}
GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    on_disk = {f[:-3] for f in os.listdir(os.path.join(ROOT, "common")) if f.endswith(".py") and f != "__init__.py"}
    assert on_disk == set(MODULES) - set(SCRIPTS)
    assert all(set(GRAPH[m]) <= set(MODULES) for m in MODULES)


def test_imports_go_down_the_layers():
    upward = [(m, n) for m in MODULES for n in GRAPH[m] if LAYER[n] > LAYER[m]]
    assert not upward, f"imports up the layer order: {upward}"


def test_no_import_circle():
    state = {}

    def visit(m, trail):
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(trail[trail.index(m):] + [m]))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in GRAPH[m]:
            visit(n, trail + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])


def closure(start):
    """Modules loaded, transitively, by importing `start` (module-level imports only)."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [n for n, at_top in GRAPH[m].items() if at_top]
    return seen


def test_toys_are_imported_only_when_asked_for():
    """The real loading and forward path, and every script, load no toy module; outside the toys
    themselves a toy is imported only inside a function (when `tiny` / a tiny folder is asked for)."""
    for m in REAL_PATH + SCRIPTS + [m for m in MODULES if m not in TOYS | TOY_TOOLS]:
        assert not closure(m) & TOYS, f"importing {m} loads {sorted(closure(m) & TOYS)}"


def test_real_path_loads_no_toy_module():
    """The same, measured: a fresh interpreter importing the loader, the forward path and every script."""
    code = ("import sys; import common.sa2va, common.lora, common.forward, common.video; "
            + "; ".join(f"import {s}" for s in SCRIPTS)
            + "; toys = sorted(m for m in sys.modules if m in ('common.tiny', 'common.tiny_qwenvl')); print(toys)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
