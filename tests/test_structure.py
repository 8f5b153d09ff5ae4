"""The shape of the code base: the copyable core {qwen3vl, qwen3vl_processor, lora, dit, model_io,
model} stands alone (copied into an empty folder it builds, runs and round-trips a checkpoint with
no other module of ours importable), imports point one way (no cycles), and no module reaches into
another's private names or re-dispatches to another script's main."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("qwen3vl", "qwen3vl_processor", "lora", "dit", "model_io", "model")
OURS = {p.stem for p in ROOT.glob("*.py")}


def imports_of(path: Path):
    """(our modules imported, [(line, text)] of private-name uses and foreign
    main() calls) of one file."""
    tree = ast.parse(path.read_text())
    deps, bad = set(), []
    aliases = {}  # local name -> our module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in OURS:
                    deps.add(a.name)
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module in OURS and node.level == 0:
            deps.add(node.module)
            bad += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                    if a.name.startswith("_")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            mod = aliases[node.value.id]
            if mod != path.stem and node.attr.startswith("_"):
                bad.append((node.lineno, f"{node.value.id}.{node.attr}"))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "main"
                and isinstance(node.func.value, ast.Name) and node.func.value.id in aliases):
            bad.append((node.lineno, f"{node.func.value.id}.main(...) re-dispatches to another script"))
    return deps, bad


def test_imports_point_one_way_and_privates_stay_private():
    graph, problems = {}, []
    for path in sorted(ROOT.glob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        deps, bad = imports_of(path)
        graph[path.stem if path.parent == ROOT else f"bench/{path.stem}"] = deps - {path.stem}
        problems += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in bad]
    assert not problems, "\n".join(problems)
    for mod in CORE:
        assert graph[mod] <= set(CORE), f"{mod} imports {sorted(graph[mod] - set(CORE))}: the core must stand alone"

    def cycle_from(node, stack):
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                return stack[stack.index(nxt):] + [nxt]
            found = cycle_from(nxt, stack + [nxt])
            if found:
                return found
        return None

    for mod in sorted(m for m in graph if not m.startswith("bench/")):
        cycle = cycle_from(mod, [mod])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def top_level_names(path: Path) -> set:
    """Names a module defines at its top level (also inside top-level if / try / with / for blocks)."""
    names = set()

    def visit(body):
        for n in body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                names.update(x.id for t in targets for x in ast.walk(t) if isinstance(x, ast.Name))
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in n.names)
            elif isinstance(n, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for block in (n.body, getattr(n, "orelse", []), getattr(n, "finalbody", []),
                              *(h.body for h in getattr(n, "handlers", []))):
                    visit(block)

    visit(ast.parse(path.read_text()).body)
    return names


def test_every_module_attribute_used_exists():
    """`module.name` for our modules, in the code, the benchmarks and the tests, names something the module
    defines: moving a function to another file cannot leave a caller behind (bench/vla.py once called
    serve.jpeg_bytes after it had moved to policy_client.py)."""
    defined = {m: top_level_names(ROOT / f"{m}.py") for m in OURS}
    missing = []
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for a in node.names if a.name in OURS}
        missing += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
                    and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr not in defined[aliases[node.value.id]] and not node.attr.startswith("__")]
    assert not missing, "\n".join(missing)


SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    OTHERS = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):  # our other modules must not be needed (the editable install
        def find_spec(self, name, path=None, target=None):  # would otherwise find them anywhere)
            if name.split(".")[0] in OTHERS:
                raise ImportError(f"the core imported {name}")
            return None

    sys.meta_path.insert(0, Block())
    sys.path.insert(0, ".")
    import numpy as np, torch
    from PIL import Image
    import model
    from model import PRESETS, VLAConfig, VLAModel
    assert model.__file__.startswith(sys.argv[2]), model.__file__
    torch.manual_seed(0)
    m = VLAModel(VLAConfig(**dict(PRESETS["tiny"], image_size=64))).eval()
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(4)]
    boxes = np.tile([5.0, 5.0, 40.0, 40.0], (4, 1))
    noise = torch.randn(16, 44)
    a = m.predict(frames, boxes, "walk", "Walk.", np.zeros(22), noise=noise)
    m.save_pretrained("ckpt")
    b = VLAModel.from_pretrained("ckpt").eval().predict(frames, boxes, "walk", "Walk.", np.zeros(22), noise=noise)
    assert a.shape == (16, 22) and np.array_equal(a, b)
    print("core ok")
""")


def test_the_core_files_stand_alone(tmp_path):
    for mod in CORE:
        (tmp_path / f"{mod}.py").write_text((ROOT / f"{mod}.py").read_text())
    others = ",".join(sorted(OURS - set(CORE)))
    run = subprocess.run([sys.executable, "-c", SCRIPT, others, str(tmp_path)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "core ok" in run.stdout, run.stderr[-3000:]
