import gzip
import hashlib
import json
import os
import pickle

import ftfy
import pytest
import torch

from dinotxt_fast.models import tokenizer as tk

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_PATH = os.path.join(TESTS, "data", "tokenizer_golden.json")
VOCAB_PATH = os.path.join(os.path.dirname(TESTS), "dinotxt_fast", "models", "data", "bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN_PATH, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tok():
    return tk.default_tokenizer()


def _versions(golden):
    return f"(golden made with ftfy {golden['ftfy_version']}, installed ftfy {ftfy.__version__})"


def test_vendored_vocab_is_the_golden_one(golden):
    with open(VOCAB_PATH, "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == golden["vocab_md5"]


def test_golden_corpus_covers_the_hard_cases(golden):
    texts = [c["text"] for c in golden["cases"]]
    assert len(texts) >= 150
    assert "" in texts and "<|endoftext|>" in texts and "fish &amp;amp; chips" in texts
    assert sum(len(c["ids"]) + 2 > 77 for c in golden["cases"]) >= 5


def test_encode_matches_clip(golden, tok):
    for case in golden["cases"]:
        assert tok.encode(case["text"]) == case["ids"], f"{case['text']!r} {_versions(golden)}"


@pytest.mark.parametrize("context_length", [77, 16])
def test_tokenize_matches_clip(golden, context_length):
    cases = golden["cases"]
    out = tk.tokenize([c["text"] for c in cases], context_length=context_length)
    assert out.dtype == torch.long and out.shape == (len(cases), context_length)
    for row, case in zip(out.tolist(), cases):
        ref = case[f"context_{context_length}"]
        assert row == ref + [tk.PAD] * (context_length - len(ref)), f"{case['text']!r} {_versions(golden)}"


def test_dog_sanity():
    ids = tk.tokenize("a photo of a dog.")
    expected = [49406, 320, 1125, 539, 320, 1929, 269, 49407] + [0] * 69
    assert ids.shape == (1, 77)
    assert ids[0].tolist() == expected


def test_special_strings_and_constants(tok):
    assert tok.encode("<|startoftext|>") == [tk.SOT]
    assert tok.encode("<|endoftext|>") == [tk.EOT]
    assert tok.vocab_size == tk.VOCAB_SIZE == 49408
    assert (tk.SOT, tk.EOT, tk.PAD) == (49406, 49407, 0)
    assert len(tok.encoder) == len(tok.decoder) == 49408


def test_truncation_keeps_eot_last():
    text = "dog " * 100
    out = tk.tokenize([text, "a cat"], context_length=16)
    assert out[0, -1].item() == tk.EOT and out[0, 0].item() == tk.SOT
    assert (out[0, 1:-1] != 0).all()
    # argmax(ids) is the pooling position of the text tower: the EOT, even when truncated.
    assert out.argmax(dim=1).tolist() == [15, 3]
    assert tk.tokenize("anything at all", context_length=2)[0].tolist() == [tk.SOT, tk.EOT]


def test_truncate_false(tok):
    n = len(tok.encode("dog " * 10)) + 2
    assert tk.tokenize("dog " * 10, context_length=n, truncate=False)[0, -1].item() == tk.EOT
    with pytest.raises(ValueError, match=r"texts\[1\] is 102 tokens long.*context_length=77"):
        tk.tokenize(["short", "dog " * 100], truncate=False)


def test_decode_round_trip(tok):
    for text in ["a photo of a dog", "two dogs playing frisbee on the beach at sunset", "caf\u00e9 \u732b \U0001f436"]:
        assert tok.decode(tok.encode(text)) == text + " "
    for text in ["Hello, world! It's 12:30pm.", "fish &amp; chips", "\ufb01sh \uff21\uff22"]:
        ids = tok.encode(text)
        assert tok.encode(tok.decode(ids)) == ids
    row = tk.tokenize("a photo of a dog.")[0]
    eot = int(row.argmax())
    assert tk.decode(row[1:eot]) == "a photo of a dog . "
    assert tk.decode([tk.SOT, 320, tk.EOT]) == "<|startoftext|>a <|endoftext|>"


def test_bad_input():
    with pytest.raises(TypeError, match="str or a list of str"):
        tk.tokenize(123)
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        tk.tokenize(["a dog", None])
    with pytest.raises(ValueError, match="at least 2"):
        tk.tokenize("a dog", context_length=1)
    with pytest.raises(TypeError, match="context_length must be an int"):
        tk.tokenize("a dog", context_length=7.0)
    with pytest.raises(TypeError, match="expects a str"):
        tk.default_tokenizer().encode(b"a dog")
    with pytest.raises(ValueError, match=r"id 49408 at position 1 is outside"):
        tk.decode([320, 49408])
    with pytest.raises(ValueError, match="outside"):
        tk.decode([-1])
    with pytest.raises(TypeError, match="position 0 is float"):
        tk.decode([1.0])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        tk.decode(torch.zeros(2, 3, dtype=torch.long))
    assert tk.tokenize([]).shape == (0, 77)


def test_corrupt_vocab_files(tmp_path):
    garbage = tmp_path / "garbage.txt.gz"
    garbage.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="not a readable gzip"):
        tk.SimpleTokenizer(garbage)
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(ValueError, match="has 3 merges after its header, CLIP needs 48894"):
        tk.SimpleTokenizer(short)
    with pytest.raises(FileNotFoundError):
        tk.SimpleTokenizer(tmp_path / "missing.txt.gz")


def test_explicit_path_cache_and_pickle(tok):
    other = tk.SimpleTokenizer(VOCAB_PATH)
    assert other.encode("a photo of a dog.") == tok.encode("a photo of a dog.")
    assert tk.default_tokenizer() is tok
    before = other.bpe.cache_info().hits
    other.encode("dog dog dog")
    assert other.bpe.cache_info().hits >= before + 2
    clone = pickle.loads(pickle.dumps(other))
    assert clone.encode("\u201cquoted\u201d caf\u00c3\u00a9") == other.encode("\u201cquoted\u201d caf\u00c3\u00a9")
