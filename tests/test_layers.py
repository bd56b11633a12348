"""The package's import layers: no module imports from a layer above its own (issue 24).

    cli -> pipeline/stages/report -> train/cluster -> config/search_space -> models/data
        -> mixing/merging/dpo/storage/paths -> errors/checks

Function-local imports count too: a late import that runs back up the layers is still a cycle
in the design. The pure mixing policies import neither Ray nor torch at module level.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ama_ray"
LAYERS = [
    ("errors", "checks"),
    ("paths", "storage", "dpo", "mixing", "merging"),
    ("models", "data"),
    ("config", "search_space"),
    ("train", "cluster"),
    ("pipeline", "stages", "report"),
    ("cli",),
]


def layer(module: str) -> int:
    """The layer of `ama_ray.<first part>...`."""
    top = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module} is in no layer: add it to LAYERS")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `ama_ray` import in a file, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ama_ray"):
            names = [node.module] if node.module != "ama_ray" else [f"ama_ray.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ama_ray.")]
    return found


def test_no_import_runs_back_up_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "ama_ray." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module in ("ama_ray.__init__", "ama_ray.py"):
            continue
        for line, target in imports(path):
            if layer(target) > layer(module):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ama_ray.stages import prepare\n")
    assert [layer(t) for _, t in imports(bad)] == [layer("ama_ray.stages")] and layer("ama_ray.stages") > layer("ama_ray.data")


def test_pure_mixing_imports_without_ray_or_torch():
    code = ("import sys; import ama_ray.mixing, ama_ray.mixing.service; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
