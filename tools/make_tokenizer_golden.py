"""Write tests/data/tokenizer_golden.json: CLIP token ids of a varied corpus, from the real CLIP tokenizers.

The reference is OpenAI CLIP's `clip/simple_tokenizer.py` (what DINOv2/DINOv3's DINO.txt code vendors),
padded and truncated as `clip.tokenize(..., truncate=True)` and DINOv3's `Tokenizer.tokenize` do.
Every string without a special-token string is cross-checked against open_clip's `tokenizer.py`
(which spells its specials differently), including its padding and truncation.

Not run in CI. To regenerate (needs network once; nothing is installed into the environment):

    pip install --no-deps --target /tmp/clip-ref clip-anytorch==2.6.0 open_clip_torch==3.3.0
    PYTHONPATH=/tmp/clip-ref python tools/make_tokenizer_golden.py

Both tokenizer files are loaded on their own with importlib, so the packages' `__init__` (which
imports torchvision) never runs. They also need ftfy, regex, numpy and torch.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys

import ftfy
import regex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "data", "tokenizer_golden.json")
VENDORED_VOCAB = os.path.join(REPO, "dinotxt_fast", "models", "data", "bpe_simple_vocab_16e6.txt.gz")
CONTEXTS = (77, 16)
SOT, EOT = 49406, 49407
SPECIAL_STRINGS = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")

LONG_CAPTION = (
    "A wide-angle photograph of a crowded farmers' market on a sunny Saturday morning, with wooden "
    "stalls full of red tomatoes, green peppers, purple eggplants and yellow squash, shoppers carrying "
    "woven baskets, a man in a straw hat weighing apples on an old brass scale, children eating ice "
    "cream near a fountain, striped awnings flapping in the breeze, bicycles leaning against a brick "
    "wall covered in ivy, and in the distance a church tower with a clock showing a quarter past ten."
)

CORPUS = [
    # plain captions and prompt templates
    "a photo of a dog.",
    "a photo of a cat.",
    "A photo of a Dog.",
    "A PHOTO OF A DOG.",
    "a photo of the large dog.",
    "a bad photo of a tench.",
    "a sculpture of a goldfish.",
    "a rendering of a great white shark.",
    "itap of a tiger shark.",
    "a close-up photo of a hammerhead shark.",
    "a black and white photo of an electric ray.",
    "a pixelated photo of the stingray.",
    "a jpeg corrupted photo of a rooster.",
    "a blurry photo of the hen.",
    "a tattoo of an ostrich.",
    "a low resolution photo of a brambling.",
    "a plastic goldfinch.",
    "a drawing of a house finch.",
    "a cropped photo of a junco.",
    "graffiti of an indigo bunting.",
    "the origami American robin.",
    "a photo of a person riding a bicycle down a hill",
    "two dogs playing frisbee on the beach at sunset",
    "An aerial view of a city at night with lots of lights",
    "a bowl of soup with a spoon next to a loaf of bread",
    "a man is standing next to a red fire hydrant",
    "a kitchen with stainless steel appliances and granite countertops",
    "a giraffe standing in a field of tall grass",
    "a sign that says STOP",
    "ADE20K: wall, building, sky, floor, tree",
    "background",
    "sky",
    "a",
    "x",
    # punctuation and symbols
    "Hello, world!",
    "what?!?!",
    "wait... what...",
    "hi!!!",
    "(parenthesised) [bracketed] {braced} <angled>",
    "semi; colon: comma, period.",
    "dash - en – em — minus -",
    "slash / backslash \\ pipe |",
    "a~b`c@d#e$f%g^h&i*j_k+l=m",
    "100% sure & 50$ paid",
    "email me at someone@example.com",
    "https://www.example.com/path?query=1&x=y#frag",
    "#hashtag @mention",
    "snake_case and camelCase and kebab-case",
    "def f(x): return x**2",
    "C++ and C# and F#",
    "#1 best-seller!",
    "...",
    "!",
    "?!",
    "<>",
    "<<<>>>",
    "©®™ § ¶ † ‡ • ° ±",
    "∑∫√∞≈≠≤≥ π",
    "→ ← ↑ ↓ ⇒",
    "★☆♥♦♣♠",
    # numbers
    "1234567890",
    "3.14159",
    "1,000,000 people",
    "the year 2024",
    "24/7",
    "1st 2nd 3rd 4th",
    "-42",
    "0.5x zoom, 10x zoom",
    "12:30pm",
    "²³¹ ½ ¾",
    "٣ ٤ ٥",
    "Ⅻ Ⅳ",
    # contractions
    "it's a dog's life",
    "don't stop",
    "they're here",
    "we've been there",
    "I'm fine",
    "you'll see",
    "he'd go",
    "IT'S LOUD",
    "rock 'n' roll",
    "'quoted' word",
    "o'clock",
    "can't won't shouldn't",
    # curly quotes and primes
    "it\u2019s a dog\u2019s life",
    "\u201cquoted\u201d and \u2018single\u2019",
    "don\u2019t",
    "\u201ehallo\u201c",
    "5\u2032 11\u2033",
    "\u00abguillemets\u00bb",
    # ligatures and compatibility forms
    "\ufb01sh and \ufb02owers",
    "o\ufb03ce \ufb00ort",
    "\ufb06",
    "\u0132sselmeer",
    # full-width forms and CJK punctuation
    "\uff21\uff22\uff23 \uff11\uff12\uff13",
    "\uff48\uff45\uff4c\uff4c\uff4f\uff01",
    "\uff08\u5168\u89d2\uff09",
    "\u3000wide\u3000space\u3000",
    # mojibake
    "caf\u00c3\u00a9",
    "\u00c3\u00a9t\u00c3\u00a9",
    "The Mona Lisa doesn\u00e2\u20ac\u2122t have eyebrows.",
    "\u00e2\u20ac\u0153quoted\u00e2\u20ac\u009d",
    "na\u00c3\u00afve r\u00c3\u00a9sum\u00c3\u00a9",
    "\u00c3\u00bcber",
    # HTML entities, single and double escaped
    "fish &amp; chips",
    "fish &amp;amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;lt;tag&amp;gt;",
    "&quot;quoted&quot; &#39;single&#39;",
    "&#8217; &#x2019; &rsquo;",
    "caf&eacute; na&iuml;ve",
    "&nbsp;spaced&nbsp;",
    "<b>html</b> &amp; more",
    "&copy; 2024 &trade;",
    "&unknownentity; &",
    # ftfy unescapes once by itself, except in text that looks like HTML: these need CLIP's two more
    "&amp;amp;amp; three times",
    "<i>fish &amp;amp; chips</i>",
    "<p>&amp;lt;tag&amp;gt;</p>",
    # emoji
    "\U0001f436 dog",
    "I love pizza \U0001f355\U0001f355",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467 family",
    "\U0001f44d\U0001f3fd thumbs up",
    "\U0001f1eb\U0001f1f7 flag",
    "\u2764\ufe0f heart",
    "\U0001f600",
    # CJK and other scripts
    "\u4e00\u53ea\u732b",
    "\u72d7\u306e\u5199\u771f",
    "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c",
    "\u30ab\u30bf\u30ab\u30ca",
    "\ud55c\uad6d\uc5b4 \ubb38\uc7a5",
    "\u0444\u043e\u0442\u043e \u0441\u043e\u0431\u0430\u043a\u0438",
    "\u03ba\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u05e9\u05dc\u05d5\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    # accents, composed and decomposed
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "cafe\u0301",
    "\u00c9COLE \u00c0 PARIS",
    "Stra\u00dfe",
    "\u0130stanbul",
    "\u00d8resund \u00e5 \u00e6",
    "Ma\u00f1ana \u00bfqu\u00e9?",
    "Dvo\u0159\u00e1k",
    # whitespace and control characters
    "  leading and trailing  ",
    "tab\tseparated\tvalues",
    "line one\nline two\r\nline three",
    "multiple     spaces",
    "\t\n  \r\n",
    "non\u00a0breaking\u00a0space",
    "em\u2003space and thin\u2009space",
    "zero\u200bwidth",
    "line\u2028separator",
    "unit\x1fseparator",
    "file\x1cseparator",
    "bell\x07char",
    "soft\u00adhyphen",
    "nul\x00char",
    # empty and special-token strings
    "",
    " ",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|startoftext|>a photo of a dog<|endoftext|>",
    "<|ENDOFTEXT|>",
    "before<|endoftext|>after",
    "<|endoftext",
    "<start_of_text>",
    "<end_of_text>",
    # long texts (> 77 tokens) and long words
    LONG_CAPTION,
    "dog " * 100,
    " ".join(str(i) for i in range(60)),
    "\u732b" * 90,
    "\U0001f436" * 40,
    "supercalifragilisticexpialidocious",
    "a" * 200,
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 4,
    LONG_CAPTION.upper(),
    "\u00e9" * 50 + " " + "\u00fc" * 50,
]


def load_module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name!r} not found; see the instructions at the top of {__file__}")
    return list(spec.submodule_search_locations)[0]


def md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def frame(ids: list[int], context_length: int) -> list[int]:
    """clip.tokenize(truncate=True) for one text, trailing padding left out."""
    ids = [SOT] + ids + [EOT]
    if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = EOT
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()

    clip_dir = package_dir("clip")
    clip_vocab = os.path.join(clip_dir, "bpe_simple_vocab_16e6.txt.gz")
    if md5(clip_vocab) != md5(VENDORED_VOCAB):
        sys.exit(f"{clip_vocab} differs from the vendored {VENDORED_VOCAB}")
    clip_tok = load_module("clip_simple_tokenizer", os.path.join(clip_dir, "simple_tokenizer.py")).SimpleTokenizer()
    open_clip_tok = load_module(
        "open_clip_tokenizer", os.path.join(package_dir("open_clip"), "tokenizer.py")
    ).SimpleTokenizer()

    if len(set(CORPUS)) != len(CORPUS):
        sys.exit("the corpus has duplicate strings")
    cases = []
    for text in CORPUS:
        ids = clip_tok.encode(text)
        case = {"text": text, "ids": ids}
        for n in CONTEXTS:
            case[f"context_{n}"] = frame(ids, n)
        # open_clip treats CLIP's special strings as text (and its own as specials): compare the rest.
        if not any(s in text.lower() for s in SPECIAL_STRINGS):
            if open_clip_tok.encode(text) != ids:
                sys.exit(f"open_clip and OpenAI CLIP disagree on {text!r}")
            for n in CONTEXTS:
                row = open_clip_tok([text], context_length=n)[0].tolist()
                framed = case[f"context_{n}"]
                if row != framed + [0] * (n - len(framed)):
                    sys.exit(f"open_clip's context {n} row differs for {text!r}")
        cases.append(case)

    golden = {
        "reference": "OpenAI CLIP clip/simple_tokenizer.py (clip-anytorch "
        f"{importlib.metadata.version('clip-anytorch')}), framed as clip.tokenize(truncate=True); "
        f"cross-checked with open_clip {importlib.metadata.version('open_clip_torch')} tokenizer.py",
        "generator": "tools/make_tokenizer_golden.py",
        "ftfy_version": ftfy.__version__,
        "regex_version": regex.__version__,
        "vocab_md5": md5(VENDORED_VOCAB),
        "format": "ids: encode(text) (no SOT/EOT, untruncated); context_N: tokenize(text, N) up to its EOT, "
        "the rest of the row is zeros",
        "contexts": list(CONTEXTS),
        "cases": cases,
    }
    # One case a line, so that a regeneration reads as a small diff.
    header = json.dumps({k: v for k, v in golden.items() if k != "cases"}, ensure_ascii=True, indent=1)
    lines = ",\n".join("  " + json.dumps(c, ensure_ascii=True, separators=(",", ":")) for c in cases)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(header[:-2] + ',\n "cases": [\n' + lines + "\n ]\n}\n")
    truncated = sum(len(c["ids"]) + 2 > CONTEXTS[0] for c in cases)
    print(f"wrote {len(cases)} cases ({truncated} longer than {CONTEXTS[0]} tokens) to {args.out}")


if __name__ == "__main__":
    main()
