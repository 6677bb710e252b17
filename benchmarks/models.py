"""Model loading: cached SmolLM2 vs reading the GGUF every time, tokenizer, tiny-random, first-use conversion.

    python benchmarks/models.py [--convert] [--repeats 2]

Each figure is timed in a fresh Python process (imports are timed apart from the load), so a
process's earlier loads never warm the next one's. The anchor is what a user pays without the
cache: ``transformers`` reading the embedded GGUF (dequantizing on every load), and the plain
``transformers`` load of the converted directory without the TransformerLens bridge. ``--convert``
also times the one-off GGUF conversion into a fresh temporary cache. Read the ratios; absolute
seconds depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# Each snippet prints {"import_s": ..., "load_s": ...}; imports are done before the clock starts.
_PRELUDE = """
import json, time
t0 = time.perf_counter()
import torch, transformers, transformer_lens
from interp.models import load_model, load_tokenizer
from interp.model_cache import cache_dir, smollm2_gguf
t1 = time.perf_counter()
"""
_CASES = {
    "bridge: load_model('smollm2-135m') from the cache": "m = load_model('smollm2-135m', device='cpu')",
    "anchor: transformers from_pretrained(cached dir), no bridge": (
        "m = transformers.AutoModelForCausalLM.from_pretrained(str(cache_dir() / 'models' / 'smollm2-135m'), attn_implementation='eager')"
    ),
    "anchor: transformers from_pretrained(GGUF), every load": (
        "g = smollm2_gguf(); m = transformers.AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name)"
    ),
    "load_tokenizer() from the cache": "t = load_tokenizer()",
    "anchor: AutoTokenizer from the GGUF": "g = smollm2_gguf(); t = transformers.AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)",
    "load_model('tiny-random')": "m = load_model('tiny-random', device='cpu')",
}
_CONVERT = "first use: GGUF -> safetensors cache conversion + load (fresh cache)"


def _run(body: str, env: dict[str, str]) -> dict[str, float]:
    """Run ``body`` after the prelude in a fresh interpreter; return its import and load seconds."""
    code = _PRELUDE + body + "\nprint(json.dumps({'import_s': t1 - t0, 'load_s': time.perf_counter() - t1}))\n"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_row(name: str, runs: list[dict[str, float]]) -> None:
    best = min(runs, key=lambda r: r["load_s"])
    print(f"| {name} | {best['load_s']:.2f} | {best['import_s']:.1f} |", flush=True)


def main() -> None:
    """Time every case ``--repeats`` times and print a markdown table (best of the repeats)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per case (the best is reported)")
    parser.add_argument("--convert", action="store_true", help="also time the one-off conversion into a fresh cache (~1-3 min)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    _run("m = load_model('smollm2-135m', device='cpu')", env)  # make sure the cache exists first
    print("| case | load s (best) | import s |", flush=True)
    print("|------|---------------|----------|", flush=True)
    rows = {}
    for name, body in _CASES.items():
        rows[name] = [_run(body, env) for _ in range(args.repeats)]
        _print_row(name, rows[name])
    if args.convert:
        with tempfile.TemporaryDirectory() as fresh:
            _print_row(_CONVERT, [_run("m = load_model('smollm2-135m', device='cpu')", {**env, "INTERP_CACHE": fresh})])
    bridge = min(r["load_s"] for r in rows["bridge: load_model('smollm2-135m') from the cache"])
    gguf = min(r["load_s"] for r in rows["anchor: transformers from_pretrained(GGUF), every load"])
    plain = min(r["load_s"] for r in rows["anchor: transformers from_pretrained(cached dir), no bridge"])
    print(f"\ncached bridge load is {gguf / bridge:.1f}x faster than reading the GGUF; bridge overhead vs plain transformers {bridge / plain:.2f}x")


if __name__ == "__main__":
    main()
