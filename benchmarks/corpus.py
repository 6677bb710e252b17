"""Default-corpus build time, token counts, and packing from the token cache vs tokenizing afresh.

    python benchmarks/corpus.py [--pack-tokens 1000000]

Builds the default corpus into a fresh temporary cache (so the figure is a first-use build),
tokenizes both splits with the default tokenizer, then times ``pack_windows`` served from the
token cache against the naive baseline of tokenizing the same documents again, in the same run.
The figure to read is that ratio; absolute seconds depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    """Run the benchmark and print one line per figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack-tokens", type=int, default=1_000_000, help="tokens to pack in the cached-vs-fresh comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["INTERP_CACHE"] = cache
        from interp.corpus import load_corpus, pack_windows
        from interp.corpus_build import default_corpus_dir
        from interp.models import load_tokenizer
        from interp.packing import token_stream

        start, cpu = time.perf_counter(), _cpu_seconds()
        meta = json.loads((default_corpus_dir(progress=False) / "meta.json").read_text())
        print(f"build: {time.perf_counter() - start:.1f} s wall, {_cpu_seconds() - cpu:.1f} CPU s incl. workers ({os.cpu_count()} CPUs), "
              f"{meta['n_documents']:,} documents, {meta['n_chars']:,} characters, sha256 {meta['sha256'][:16]}")
        tokenizer = load_tokenizer()
        for split in ("train", "eval"):
            corpus = load_corpus("default", split)
            start = time.perf_counter()
            stream, _ = token_stream(tokenizer, corpus, progress=False)
            print(f"tokens[{split}]: {len(stream):,} (incl. one EOS per document), tokenized in {time.perf_counter() - start:.1f} s")
        corpus = load_corpus("default", "train")
        start = time.perf_counter()
        windows = pack_windows(tokenizer, corpus, ctx=128, n_tokens=args.pack_tokens, progress=False)
        cached = time.perf_counter() - start
        start = time.perf_counter()
        texts, have = [], 0
        for text in corpus.documents():
            texts.append(text)
            have += len(text) // 4  # stop near the same amount of text; the baseline only has to tokenize it
            if have >= args.pack_tokens:
                break
        tokenizer(texts, add_special_tokens=False, verbose=False)
        fresh = time.perf_counter() - start
        print(f"pack {windows.shape[0]:,} x 128 from the token cache: {cached:.2f} s; tokenizing the same text afresh: {fresh:.2f} s; "
              f"ratio fresh/cached = {fresh / cached:.1f}x")


if __name__ == "__main__":
    main()
