"""The CLIP byte-pair-encoding tokenizer, giving exactly the ids of OpenAI CLIP's `simple_tokenizer`.

DINO.txt's text tower (DINOv2 and DINOv3 releases alike) uses OpenAI CLIP's tokenizer unchanged:
text clean-up with ftfy and a double HTML unescape, whitespace collapsed, lowercased, split by
CLIP's regular expression, byte-level BPE with the 48,894 merges of `bpe_simple_vocab_16e6.txt.gz`
(vendored in `data/`, MIT licence, see `data/LICENSE-CLIP-BPE.txt`). `tokenize()` frames each text
as SOT + ids + EOT, zero padded; too-long texts are cut with EOT kept as the last token.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import operator
import os
import zlib
from typing import Iterable, Optional, Union

# ftfy and regex are the libraries CLIP itself uses: exact ids need ftfy's text fixes (curly quotes,
# ligatures, full-width forms, mojibake) and regex's Unicode classes (\p{L}, \p{N}), which `re` lacks.
import ftfy
import regex
import torch

SOT = 49406  # "<|startoftext|>"
EOT = 49407  # "<|endoftext|>"
PAD = 0
VOCAB_SIZE = 49408
DEFAULT_CONTEXT_LENGTH = 77

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
_SPECIALS = (SOT_TEXT, EOT_TEXT)

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges of the file (line 0 is a version header): with the 512
# byte symbols (bare and word-final) and the 2 specials that makes the 49408-token vocabulary.
_NUM_MERGES = 49152 - 256 - 2

# CLIP's split: the special strings, English contractions, letter runs, single digits, and runs of
# everything else that is not whitespace. IGNORECASE matters for the contractions only (text is
# lowercased first), kept for parity.
_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_NOT_A_MERGE = float("inf")
_BPE_CACHE_SIZE = 1 << 16  # distinct pre-tokens remembered per tokenizer

TextInput = Union[str, list[str], tuple[str, ...]]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map, in byte order,
    to U+0100 onwards, so BPE never sees whitespace or control characters. The dict's order (printable
    bytes first) is the order of the first 256 vocabulary ids.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's normalisation: ftfy fixes, HTML unescaped twice (for "&amp;amp;"), whitespace collapsed, lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = _WHITESPACE.sub(" ", text.strip()).strip()
    return text.lower()


def _read_merges(data: bytes, source: str) -> list[tuple[str, str]]:
    try:
        lines = gzip.decompress(data).decode("utf-8").split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"BPE vocabulary {source} is not a readable gzip of UTF-8 text: {exc}") from exc
    lines = lines[1 : _NUM_MERGES + 1]
    if len(lines) != _NUM_MERGES:
        raise ValueError(
            f"BPE vocabulary {source} has {len(lines)} merges after its header, CLIP needs {_NUM_MERGES}"
        )
    merges = []
    for lineno, line in enumerate(lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"BPE vocabulary {source}, line {lineno}: expected a pair of symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class SimpleTokenizer:
    """CLIP's BPE tokenizer (vocabulary of 49408: 512 byte symbols, 48894 merges, SOT, EOT).

    `bpe_path` loads another copy of the vocabulary file; by default the one vendored in the package.
    The file is checked: a corrupt or foreign vocabulary raises ValueError rather than giving wrong ids.
    """

    def __init__(self, bpe_path: Optional[Union[str, os.PathLike]] = None):
        if bpe_path is None:
            resource = importlib.resources.files(__package__) / "data" / _VOCAB_FILE
            source = f"{__package__}/data/{_VOCAB_FILE}"
            try:
                data = resource.read_bytes()
            except FileNotFoundError as exc:
                raise FileNotFoundError(
                    f"the vendored BPE vocabulary {source} is missing from the installed package"
                ) from exc
        else:
            source = os.fspath(bpe_path)
            with open(source, "rb") as f:
                data = f.read()
        self._bpe_path = None if bpe_path is None else source

        merges = _read_merges(data, source)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_SPECIALS)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        # A later duplicate of a merge overrides an earlier one, as in CLIP's dict(zip(merges, ranks)).
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        if len(self.decoder) != VOCAB_SIZE or self.encoder[SOT_TEXT] != SOT or self.encoder[EOT_TEXT] != EOT:
            raise ValueError(
                f"BPE vocabulary {source} gives {len(self.decoder)} distinct tokens, "
                f"SOT={self.encoder[SOT_TEXT]}, EOT={self.encoder[EOT_TEXT]}; "
                f"CLIP's has {VOCAB_SIZE}, SOT={SOT}, EOT={EOT}"
            )
        # Per-instance cache (a decorator on the method would be shared by, and keep alive, every instance).
        self.bpe = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._bpe)

    def __reduce__(self):
        # The cached bound method does not pickle; DataLoader workers rebuild the tokenizer instead.
        return (type(self), (self._bpe_path,))

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def _bpe(self, token: str) -> tuple[str, ...]:
        """Split one byte-encoded pre-token into vocabulary pieces (the last one carries "</w>").

        Repeatedly merges every occurrence (left to right, non-overlapping) of the adjacent pair with
        the lowest merge rank, as CLIP does.
        """
        if token in _SPECIALS:
            return (token,)
        word = list(token[:-1]) + [token[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, _NOT_A_MERGE))
            if best not in ranks:
                break
            first, second = best
            merged = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without SOT/EOT. The special strings in the text become SOT/EOT ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        ids = []
        for piece in _SPLIT.findall(clean_text(text)):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sub] for sub in self.bpe(token))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` as CLIP decodes it: word ends become spaces, nothing is skipped.

        Invalid UTF-8 (a multi-byte character cut by truncation) becomes U+FFFD. To read a row of
        `tokenize()`, pass `row[1:eot_index]`.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex:
                raise ValueError(f"decode() expects a 1-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
            ids = ids.tolist()
        pieces = []
        for pos, i in enumerate(ids):
            try:
                i = operator.index(i)  # Python and NumPy integers
            except TypeError:
                raise TypeError(f"decode(): id at position {pos} is {type(i).__name__}, expected int") from None
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"decode(): id {i} at position {pos} is outside the vocabulary [0, {VOCAB_SIZE})")
            pieces.append(self.decoder[i])
        text = "".join(pieces)
        data = bytes(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize(
        self, texts: TextInput, context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = True
    ) -> torch.Tensor:
        """LongTensor [B, context_length]: SOT + ids + EOT, zero padded.

        A text longer than the context is cut to `context_length` tokens with EOT as the last one
        (open_clip and DINO.txt behaviour); with `truncate=False` it raises ValueError instead.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise TypeError(f"tokenize() expects a str or a list of str, got {type(texts).__name__}")
        for idx, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"tokenize(): texts[{idx}] is {type(text).__name__}, expected str")
        if isinstance(context_length, bool) or not isinstance(context_length, int):
            raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")

        rows = []
        for idx, text in enumerate(texts):
            ids = [SOT] + self.encode(text) + [EOT]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"tokenize(): texts[{idx}] is {len(ids)} tokens long (with SOT/EOT), "
                        f"more than context_length={context_length}; pass truncate=True to cut it"
                    )
                ids = ids[: context_length - 1] + [EOT]
            rows.append(ids + [PAD] * (context_length - len(ids)))
        if not rows:
            return torch.zeros(0, context_length, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    __call__ = tokenize


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer on the vendored vocabulary, loaded once on first use."""
    return SimpleTokenizer()


def tokenize(
    texts: TextInput, context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = True
) -> torch.Tensor:
    """CLIP token ids, LongTensor [B, context_length] (see `SimpleTokenizer.tokenize`)."""
    return default_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)


def decode(ids: Iterable[int]) -> str:
    """Text of CLIP token ids (see `SimpleTokenizer.decode`)."""
    return default_tokenizer().decode(ids)
