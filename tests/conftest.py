import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import torch

# Make the flat top-level modules (qwen3vl.py, lora.py, ...) importable from tests
# without installing the package.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tests use tiny tensors: one intra-op thread avoids OpenMP spin-waiting against
# DataLoader workers, torchrun children and other processes on small CI machines
# (measured: tiny ops 30x slower with 2 contended threads).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    """The tiny model with the released structure (LoRA on the LLM, adapters perturbed off zero), eval mode, 64 px
    frames: what the inference and server tests run (each module gets its own, so optimizing one cannot leak)."""
    from test_model import perturb_lora, tiny_lora_config

    from model import VLAModel

    torch.manual_seed(0)
    m = VLAModel(tiny_lora_config(image_size=64)).eval()
    perturb_lora(m)
    return m


@pytest.fixture(autouse=True)
def keep_threads():
    """train.main (and the benches it shares code with) set the thread count of the process they run in: every
    test gets back the count it started with."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)

# Parity tests compare against transformers and peft at the exact versions pinned
# in pyproject.toml's `test` extra (the one place they are written). Against any other version
# they fail up front, naming both versions: parity verified against one release says nothing about
# the next (transformers 5.25 changed the video prompt layout).
REFERENCES = ("transformers", "peft")
_pyproject = (ROOT / "pyproject.toml").read_text()
PINNED = {name: m.group(1) for name in REFERENCES if (m := re.search(rf'"{name}==([^"]+)"', _pyproject))}
_uses_by_file = {}


def _references_used(node):
    """Reference packages that `node` imports (import, from-import or pytest.importorskip)."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            found.add(n.module.split(".")[0])
        elif (isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", "")) == "importorskip"
              and n.args and isinstance(n.args[0], ast.Constant)):
            found.add(str(n.args[0].value).split(".")[0])
    return found & set(REFERENCES)


def _uses(path):
    """{top-level function name: references it imports, itself or through the file's functions it
    calls}, and "" for the module's own top-level statements."""
    if path not in _uses_by_file:
        tree = ast.parse(path.read_text(), str(path))
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        uses = {name: _references_used(n) for name, n in defs.items()}
        calls = {name: {m.id for m in ast.walk(n) if isinstance(m, ast.Name)} & defs.keys()
                 for name, n in defs.items()}
        # propagate along calls until nothing changes (at most one round per function)
        for _ in defs:
            new = {name: uses[name].union(*(uses[c] for c in calls[name])) for name in defs}
            if new == uses:
                break
            uses = new
        uses[""] = set().union(*(_references_used(n) for n in tree.body if n not in defs.values()))
        _uses_by_file[path] = uses
    return _uses_by_file[path]


def pytest_runtest_setup(item):
    """A test whose module, function or fixtures import a reference runs only
    against its pinned version."""
    uses = _uses(Path(str(item.fspath)))
    names = ["", getattr(item, "originalname", item.name), *getattr(item, "fixturenames", ())]
    for name in sorted(set().union(*(uses.get(n, set()) for n in names))):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # absent: the test's own importorskip skips it
        if name not in PINNED:
            pytest.fail(f"pyproject.toml's `test` extra has no exact pin \"{name}==X\" for this parity test",
                        pytrace=False)
        if installed != PINNED[name]:
            pytest.fail(f"{name} {installed} is installed, but the parity tests are verified against {name} "
                        f"{PINNED[name]} (pinned in pyproject.toml's `test` extra): pip install -e \".[test]\", "
                        f"or move the pin there deliberately and fix what the new version changed", pytrace=False)
