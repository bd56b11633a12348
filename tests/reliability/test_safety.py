"""Safe defaults: no remote code unless asked, safetensors weights, no unpickling, secrets redacted."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from ama_ray.storage import redact_env

PACKAGE = Path(__file__).resolve().parents[2] / "ama_ray"
SOURCES = sorted(PACKAGE.rglob("*.py"))
SECRET = "s3cr3t-value-do-not-log"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    """Dotted name of a call target (`torch.load`, `x.from_pretrained` -> `.from_pretrained`)."""
    if isinstance(func, ast.Attribute):
        base = func.value.id if isinstance(func.value, ast.Name) else ""
        return f"{base}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _parsed():
    for path in SOURCES:
        yield path, ast.parse(path.read_text(), str(path))


def test_trust_remote_code_is_off_unless_configured(monkeypatch, tmp_path):
    import transformers

    from ama_ray.config import ModelConfig
    from ama_ray.models import loading

    seen = []

    def record(kind):
        def from_pretrained(path, **kwargs):
            seen.append((kind, kwargs.get("trust_remote_code")))
            raise OSError("stop here")
        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model"))
    for load in (loading.load_tokenizer, loading.load_model):
        with pytest.raises(loading.ModelError):
            load(str(tmp_path))
    assert seen == [("tokenizer", False), ("model", False)]
    assert ModelConfig().trust_remote_code is False
    # Nowhere in the package is remote code switched on by a literal.
    for path, tree in _parsed():
        for call in _calls(tree):
            value = _kw(call, "trust_remote_code")
            assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{call.lineno}"


def test_every_torch_load_is_weights_only():
    found = []
    for path, tree in _parsed():
        for call in _calls(tree):
            if _name(call.func) == "torch.load":
                value = _kw(call, "weights_only")
                found.append(path.name)
                assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno} torch.load without weights_only=True"
    assert found, "expected the optimizer checkpoint to be read with torch.load"


def test_nothing_unpickles():
    banned_modules = {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
    for path, tree in _parsed():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not banned_modules & {n.split(".")[0] for n in names}, f"{path}:{node.lineno} imports {names}"
        for call in _calls(tree):
            name = _name(call.func)
            assert not name.endswith("read_pickle"), f"{path}:{call.lineno}"
            allow = _kw(call, "allow_pickle")
            assert not (isinstance(allow, ast.Constant) and allow.value is True), f"{path}:{call.lineno}"
            assert _kw(call, "safe_serialization") is None or _kw(call, "safe_serialization").value is True, f"{path}:{call.lineno}"


def test_weights_on_disk_are_safetensors(tiny_run):
    _cfg, run_dir = tiny_run
    model_dirs = [p.parent for p in run_dir.rglob("config.json") if (p.parent / "tokenizer_config.json").exists()]
    assert len(model_dirs) >= 5  # three specialists, two generalists
    for d in model_dirs:
        assert (d / "model.safetensors").exists(), d
    pickled = [p for p in run_dir.rglob("*") if p.suffix in (".bin", ".pkl", ".pickle", ".pt", ".pth")]
    # optim.pt (optimizer + scheduler tensors) is the only torch.save file; it is read with weights_only=True.
    assert {p.name for p in pickled} <= {"optim.pt"}, pickled
    for ckpt in run_dir.glob("_checkpoints/*/*/step_*"):
        assert (ckpt / "model.safetensors").exists(), ckpt


@pytest.mark.parametrize(
    "name, hidden",
    [("HF_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True), ("wandb_api_key", True), ("GITHUB_Token", True),
     ("MY_SECRET", True), ("PATH", False), ("HOME", False), ("RAY_ADDRESS", False)],
)
def test_redact_env_hides_token_key_secret_names(name, hidden):
    out = redact_env({name: SECRET})
    assert (out[name] == "<redacted>") is hidden and (out[name] == SECRET) is not hidden


def test_workers_get_only_allowlisted_env(monkeypatch):
    from ama_ray.train.launch import forwarded_env

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    env = forwarded_env()
    assert SECRET not in json.dumps(env) and env["HF_HUB_OFFLINE"] == "1"
    assert "DS_ACCELERATOR" not in env and forwarded_env(cpu_only=True)["DS_ACCELERATOR"] == "cpu"


def test_whole_environment_is_read_only_through_redact_env():
    """Only `redact_env` may take the whole `os.environ` (to log or store it); others read named keys."""
    offenders = []
    for path, tree in _parsed():
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        funcs = {n: n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr == "environ" and _name(node) == "os.environ"):
                continue
            parent = parents.get(node)
            named = isinstance(parent, ast.Subscript) or (
                isinstance(parent, ast.Attribute) and parent.attr in ("get", "setdefault", "pop")
            ) or (isinstance(parent, ast.Compare) and parent.comparators and parent.comparators[0] is node)
            owner = parent
            while owner is not None and owner not in funcs:
                owner = parents.get(owner)
            if not named and funcs.get(owner) != "redact_env":
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == []
