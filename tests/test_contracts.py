"""Shared contracts: user errors, atomic writes, path containment, direction artefacts, CLI boundary."""

from __future__ import annotations

import errno
import json
import os
from unittest import mock

import pytest
import torch

import interp
from interp.errors import UserError, suggest
from interp.files import atomic_write_json, atomic_write_text, contained_path


def test_user_error_is_one_line():
    err = UserError("bad thing\nhappened   here")
    assert str(err) == "bad thing happened here"


def test_suggest_names_close_matches():
    assert "blocks.1.hook_resid_post" in suggest("blocks.1.hook_resid_pst", ["blocks.1.hook_resid_post", "embed"])
    assert suggest("zzz", ["blocks.1.hook_resid_post"]) == ""


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_errors_keep_old_file(tmp_path, code):
    p = tmp_path / "keep.txt"
    atomic_write_text(p, "old")
    with mock.patch("interp.files.os.replace", side_effect=OSError(code, os.strerror(code))):
        with pytest.raises(UserError) as info:
            atomic_write_text(p, "new")
    assert "\n" not in str(info.value)
    assert p.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_contained_path_refuses_escapes(tmp_path):
    assert contained_path(tmp_path, "a/b.safetensors") == (tmp_path / "a/b.safetensors").resolve()
    for bad in ["../x", "/etc/passwd", "a/../../x"]:
        with pytest.raises(UserError):
            contained_path(tmp_path, bad)


def test_direction_roundtrip_and_corruption(tmp_path):
    vec = torch.tensor([3.0, 4.0, 0.0])
    d = interp.Direction(vector=vec, hook_name="blocks.0.hook_resid_post", model="tiny-random", source="test")
    interp.save_direction(d, tmp_path / "dir")
    back = interp.load_direction(tmp_path / "dir")
    assert torch.equal(back.vector, vec) and back.hook_name == d.hook_name
    cfg = json.loads((tmp_path / "dir/cfg.json").read_text())
    assert cfg["norm"] == pytest.approx(5.0) and cfg["format_version"] == 1
    (tmp_path / "dir/vector.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupted"):
        interp.load_direction(tmp_path / "dir")
    with pytest.raises(UserError, match="not a direction directory"):
        interp.load_direction(tmp_path / "nope")


def test_direction_refuses_nan(tmp_path):
    d = interp.Direction(vector=torch.tensor([float("nan"), 1.0]), hook_name="h", model="m", source="s")
    with pytest.raises(UserError, match="NaN"):
        interp.save_direction(d, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_interp_never_imports_higher_layers():
    import subprocess
    import sys

    code = "import sys, interp, interp.directions, interp.files, interp.dictionary; print([m for m in sys.modules if m.split('.')[0] in ('saes','probes','experiments')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["harvest", "--tokens", "abc", "--out", "x", "--hook", "h"], "Invalid value for '--tokens'"),
        (["harvest", "--out", "x"], "Missing option '--hook'"),
        (["no-such-command"], "No such command"),
    ],
)
def test_cli_usage_errors_are_one_line(argv, message):
    from typer.testing import CliRunner

    from experiments.cli import app

    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output
