"""Study config parsing and stage caching (no model needed)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.config import StudyConfig, load_study
from interp.configparse import parse_dataclass, to_plain
from experiments.stages import Stage, StageRunner
from experiments.tomlwrite import dumps_toml
from interp.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_study(path)
    assert cfg.harvest.hooks


@pytest.mark.parametrize(
    "text, message",
    [
        ("[harvest]\nn_tokns = 5\n", "unknown key config.harvest.n_tokns (did you mean: n_tokens"),
        ("[harvest]\nn_tokens = 'many'\n", "config.harvest.n_tokens must be an integer"),
        ("[harvest]\nn_tokens = 0\n", "n_tokens = 0 must be > 0"),
        ("[sae]\nsettings = [{ n_latents = 64, k = 64 }]\n", "k = 64 must be smaller than n_latents = 64"),
        ("[sae]\nsettings = [{ n_latents = 64, kk = 4 }]\n", "unknown key config.sae.settings[0].kk"),
        ("[model]\ndtype = 'float8'\n", "dtype = 'float8' is not supported"),
        ("[probes]\npooling = 'max'\n", "use 'last' or 'mean'"),
        ("seed = true\n", "config.seed must be an integer"),
        ("[sae]\nauxk = 'yes'\n", "must be true or false"),
        ("[sae]\nenc_init_scale = 0.0\n", "config.sae.enc_init_scale = 0.0 must be > 0"),
        ("[harvest\n", "not valid TOML"),
        ("modle = 1\n", "unknown key config.modle (did you mean: model?)"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(UserError) as info:
        load_study(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_study(tmp_path / "nope.toml")


def test_config_cannot_execute_code(tmp_path):
    # TOML is data: a Python-looking value stays a string and fails type checks, nothing runs.
    marker = tmp_path / "pwned"
    text = f"name = \"__import__('os').system('touch {marker}')\"\n"
    cfg = load_study(write(tmp_path, text))
    assert cfg.name.startswith("__import__") and not marker.exists()


settings_st = st.fixed_dictionaries(
    {"n_latents": st.integers(2, 10_000)}, optional={"k": st.integers(1, 64)}
)


@settings(max_examples=60, deadline=None)
@given(
    n_tokens=st.integers(1, 10**9),
    ctx=st.integers(1, 4096),
    hooks=st.lists(st.from_regex(r"blocks\.[0-9]{1,2}\.hook_resid_post", fullmatch=True), min_size=1, max_size=3),
    sae_settings=st.lists(settings_st, min_size=1, max_size=3),
    seed=st.integers(0, 2**31),
)
def test_valid_configs_roundtrip_through_toml(n_tokens, ctx, hooks, sae_settings, seed):
    data = {"seed": seed, "harvest": {"n_tokens": n_tokens, "ctx": ctx, "hooks": hooks}, "sae": {"settings": sae_settings}}
    ok = all(s.get("k", 32) < s["n_latents"] for s in sae_settings)
    if not ok:
        with pytest.raises(UserError):
            parse_dataclass(StudyConfig, data)
        return
    cfg = parse_dataclass(StudyConfig, data)
    again = parse_dataclass(StudyConfig, tomllib.loads(dumps_toml(to_plain(cfg))))
    assert to_plain(again) == to_plain(cfg)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.integers() | st.text(max_size=5) | st.booleans(), max_size=4))
def test_random_tables_parse_or_fail_cleanly(data):
    try:
        parse_dataclass(StudyConfig, {"harvest": data})
    except UserError as err:
        assert "\n" not in str(err)


def test_stage_runner_caches_and_rekeys(tmp_path):
    calls = []
    log = []
    params = {"x": 1}

    def work(directory, upstream):
        calls.append(directory.name)
        (directory / "out.txt").write_text(str(params["x"]))
        return {"value": params["x"]}

    def make():
        return Stage("a", inputs=lambda: dict(params), run=work)

    StageRunner(tmp_path, log.append).run(make())
    StageRunner(tmp_path, log.append).run(make())
    assert len(calls) == 1 and log[-1]["event"] == "stage_cached"
    params["x"] = 2  # a changed config gets a new directory; the old output survives
    StageRunner(tmp_path, log.append).run(make())
    assert len(calls) == 2 and calls[0] != calls[1]
    assert sorted(p.read_text() for p in tmp_path.glob("stages/*/out.txt")) == ["1", "2"]
    StageRunner(tmp_path, log.append).run(make(), force=True)
    assert len(calls) == 3
    meta = json.loads((tmp_path / "stages" / calls[-1] / "stage.json").read_text())
    assert meta["summary"] == {"value": 2}


def test_interrupted_stage_is_rerun_in_same_directory(tmp_path):
    seen = []

    def flaky(directory, upstream):
        seen.append(directory)
        if len(seen) == 1:
            (directory / "partial").write_text("half")
            raise KeyboardInterrupt
        assert (directory / "partial").read_text() == "half"  # partial work is there to resume from
        return {}

    stage = Stage("b", inputs=lambda: {}, run=flaky)
    with pytest.raises(KeyboardInterrupt):
        StageRunner(tmp_path, lambda e: None).run(stage)
    StageRunner(tmp_path, lambda e: None).run(stage)
    assert seen[0] == seen[1]


def test_dependent_stage_needs_upstream(tmp_path):
    with pytest.raises(UserError, match="needs a"):
        StageRunner(tmp_path, lambda e: None).run(Stage("b", inputs=lambda: {}, run=lambda d, u: {}, depends=("a",)))


def test_encoder_init_scale_defaults_agree():
    import inspect

    from experiments.commands.train import train_sae
    from experiments.config import SAEConfig
    from saes.config import TrainConfig
    from saes.stacking import build_stack
    from saes.step import DEFAULT_ENC_INIT_SCALE, init_stack

    cli_default = inspect.signature(train_sae).parameters["enc_init_scale"].default.default
    library = [inspect.signature(f).parameters["enc_init_scale"].default for f in (init_stack, build_stack)]
    assert {SAEConfig().enc_init_scale, TrainConfig.enc_init_scale, cli_default, *library} == {DEFAULT_ENC_INIT_SCALE}


def test_encoder_init_scale_one_leaves_the_train_stage_key_alone(tmp_path):
    from experiments import study_stages

    def train_inputs(text):
        stages = {st.name: st for st in study_stages.build(load_study(write(tmp_path, text)), None, print, False)}
        return json.dumps(stages["train"].inputs())

    # runs made before the option (all at 1.0) keep their cached stages; the default since is part of the key
    assert "enc_init_scale" not in train_inputs("[sae]\nenc_init_scale = 1.0\n")
    assert f'"enc_init_scale": {3 ** -0.5}' in train_inputs("")
    assert '"enc_init_scale": 0.58' in train_inputs("[sae]\nenc_init_scale = 0.58\n")
    # the bf16 CPU encoder (off by default) enters the key only when on
    assert "cpu_bf16_encoder" not in train_inputs("") and '"cpu_bf16_encoder": true' in train_inputs("[sae]\ncpu_bf16_encoder = true\n")
