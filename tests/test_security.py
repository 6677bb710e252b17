"""Security: no unpickling, no remote code by default, no code from configs, no paths escaping artefacts.

Related tests elsewhere: tests/test_models.py::test_remote_code_needs_explicit_trust (a local model
directory with ``auto_map`` code is refused without the flag), tests/test_experiment_config.py::
test_config_cannot_execute_code, tests/test_store.py::test_manifest_paths_must_stay_inside (``..``).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from interp.errors import UserError
from interp.files import contained_path
from interp.store import ActivationStore
from saes import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("interp", "saes", "probes", "experiments", "benchmarks")


def _sources() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 40  # the scan really sees the tree
    return files


def _call_name(node: ast.Call) -> str:
    """Dotted name of a call's function (``torch.load``, ``pickle.loads``), '' when not a plain name."""
    parts, func = [], node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[str]:
    """Unsafe deserialisation or code execution found in ``source`` (one description per finding)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = _call_name(node)
            kwargs = {kw.arg: kw.value for kw in node.keywords}
            if name.endswith("torch.load") and not _is_true(kwargs.get("weights_only")):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if name.split(".")[-1] in ("load", "loads", "Unpickler") and name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle"):
                found.append(f"line {node.lineno}: {name}")
            if name in ("eval", "exec"):
                found.append(f"line {node.lineno}: {name}()")
            if _is_true(kwargs.get("trust_remote_code")):
                found.append(f"line {node.lineno}: trust_remote_code=True")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
            for arg, default in zip(args, defaults):
                if arg.arg == "trust_remote_code" and _is_true(default):
                    found.append(f"line {node.lineno}: {node.name}(trust_remote_code=True) default")
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "trust_remote_code" and _is_true(node.value):
            found.append(f"line {node.lineno}: trust_remote_code field defaults to True")
    return found


def test_the_scanner_catches_each_unsafe_pattern():
    bad = (
        "import torch, pickle\n"
        "torch.load('x')\n"
        "torch.load('x', weights_only=False)\n"
        "pickle.loads(b'')\n"
        "eval('1')\n"
        "AutoModel.from_pretrained('m', trust_remote_code=True)\n"
        "def load(name, trust_remote_code=True): pass\n"
        "class C:\n    trust_remote_code: bool = True\n"
    )
    assert len(unsafe_calls(bad)) == 7
    assert unsafe_calls("import torch\ntorch.load('x', weights_only=True)\ndef f(trust_remote_code=False): pass\n") == []


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_source_tree_has_no_unsafe_loading(path):
    assert unsafe_calls(path.read_text()) == []


# -- paths in artefacts stay inside their directory ---------------------------------------------


@pytest.fixture()
def store(tmp_path) -> Path:
    ActivationStore.from_tensors(tmp_path / "s", {"blocks.0.hook_resid_post": torch.randn(8, 4)}, tokens=torch.arange(8), model="m")
    return tmp_path / "s"


def _tamper(store: Path, path: str, which: str = "files") -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    entry = manifest["shards"][0]["files"]["blocks.0.hook_resid_post"] if which == "files" else manifest["shards"][0]["meta"]
    entry["path"] = path
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("which", ["files", "meta"])
def test_manifest_with_an_absolute_path_is_refused(store, which):
    _tamper(store, "/etc/hostname", which)
    with pytest.raises(UserError, match="is absolute"):
        ActivationStore(store)


def test_manifest_with_a_symlink_out_of_the_store_is_refused(store, tmp_path):
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"secret")
    (store / "shards" / "link.safetensors").symlink_to(outside)
    _tamper(store, "shards/link.safetensors")
    with pytest.raises(UserError, match="escapes"):
        ActivationStore(store)
    assert outside.read_bytes() == b"secret"


def test_store_command_refuses_a_traversing_manifest_in_one_line(store):
    from experiments.cli import app

    _tamper(store, "../../../../etc/passwd", "meta")
    result = CliRunner().invoke(app, ["store", str(store), "--verify"])
    assert result.exit_code == 2 and "escapes its directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_writer_never_deletes_outside_the_store(tmp_path):
    # a crash-cleaning writer must only delete its own orphans, even when a hook name looks like a path
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    acts = {"../../victim": torch.randn(6, 3)}
    store = ActivationStore.from_tensors(tmp_path / "deep" / "s", acts, model="m")
    assert victim.read_text() == "keep"
    for shard in store.manifest["shards"]:
        for entry in shard["files"].values():
            assert contained_path(store.path, entry["path"]).is_relative_to(store.path.resolve())
    assert torch.equal(store.read("../../victim"), acts["../../victim"])


def test_checkpoint_naming_a_file_outside_its_directory_is_ignored(tmp_path):
    run = tmp_path / "run"
    name, digest, meta = ckpt.write_state(run, 4, 0, {"x": torch.ones(2)}, {"scales": {}})
    ckpt.commit(run, 4, "fp", {"data_batch": 4}, [(name, digest, meta)])
    assert ckpt.latest(run, "fp").step == 4
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    directory = ckpt.checkpoint_dir(run, 4)
    tampered = json.loads((directory / "meta.json").read_text())
    tampered["files"] = {os.path.relpath(secret, directory): ckpt.sha256_file(secret), **tampered["files"]}
    (directory / "meta.json").write_text(json.dumps(tampered))
    assert ckpt.latest(run, "fp") is None  # not a valid checkpoint: training starts over instead of trusting it


def test_a_config_value_that_looks_like_code_is_only_a_string(tmp_path):
    from experiments.cli import app

    marker = tmp_path / "pwned"
    (tmp_path / "c.toml").write_text(f"name = \"x\"\n[model]\nname = \"__import__('os').system('touch {marker}')\"\n")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no model directory at __import__" in result.stderr
    assert not marker.exists()


_MODEL_COMMANDS = {
    "eval-sae": ["eval-sae", "--sae", "{sae}"],
    "dashboard": ["dashboard", "--sae", "{sae}", "--out", "{tmp}/d.html"],
    "features stats": ["features", "stats", "--sae", "{sae}"],
    "features search": ["features", "search", "--sae", "{sae}", "--query", "the"],
    "probe": ["probe", "--model", "tiny-random", "--task", "sentiment", "--out", "{tmp}/p"],
    "steer": ["steer", "--sae", "{sae}", "--feature", "0", "--clamp", "1", "--prompt", "hi"],
    "harvest": ["harvest", "--model", "tiny-random", "--hook", "blocks.0.hook_resid_post", "--tokens", "64", "--out", "{tmp}/h"],
}


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("name", sorted(_MODEL_COMMANDS))
def test_every_model_loading_command_forwards_trust_remote_code(name, trusted, tmp_path, monkeypatch):
    """Remote code stays off unless --trust-remote-code is passed, and the flag reaches load_model."""
    import interp
    import interp.models
    import saes
    from interp.errors import UserError
    from typer.testing import CliRunner

    from experiments.cli import app

    seen = []

    def fake_load_model(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", False))
        raise UserError("stopped at load_model")

    monkeypatch.setattr(interp.models, "load_model", fake_load_model)
    monkeypatch.setattr(interp, "load_model", fake_load_model, raising=False)
    saes.TopKSAE(64, 32, 4, hook_name="blocks.0.hook_resid_post", model="tiny-random").save(tmp_path / "sae")
    args = [a.format(sae=tmp_path / "sae", tmp=tmp_path) for a in _MODEL_COMMANDS[name]]
    result = CliRunner().invoke(app, args + (["--trust-remote-code"] if trusted else []))
    assert result.exit_code == 2 and "stopped at load_model" in result.output, result.output
    assert seen == [trusted]
