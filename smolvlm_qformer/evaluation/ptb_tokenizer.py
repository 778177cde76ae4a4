"""Caption tokenisation as the COCO caption evaluation does it, in Python.

The COCO toolkit (`pycocoevalcap.tokenizer.PTBTokenizer`) runs Stanford CoreNLP 3.4.1's Java `PTBTokenizer` with
`-preserveLines -lowerCase`, then drops the tokens in its punctuation list. This module reproduces that for the text
captions contain, without Java:

- lower-cased; curly quotes read as straight ones;
- punctuation split off words; `n't`, `'s`, `'re`, `'ve`, `'ll`, `'m`, `'d` split off (`can't` -> `ca n't`), and
  `cannot`, `gonna`, `gotta`, `wanna`, `gimme`, `lemme` split in two, as PTB does;
- kept whole: hyphenated words (`t-shirt`), numbers with `.,:/` inside (`3.5`, `1,000`, `10:30`, `3/4`), dotted
  abbreviations (`u.s.`, `a.m.`) and a few titles (`mr.`, `dr.`, `st.`, `etc.`);
- brackets become PTB's `-lrb-`, `-rrb-`, `-lsb-`, ... and the round and curly ones stay in the output: the COCO
  script compares the lower-cased tokens with an upper-case `-LRB-` in its list, so they are never removed;
- dropped, as in the COCO list: `. , ; : ? ! - -- ...` and the quote tokens; runs like `!!!` stay, as in COCO.

Known differences from the Java tokenizer (all rare in captions): leading apostrophes (`'90s`, `'cause`), `@word`,
`rock'n'roll` and `y'all` are not special-cased, and only the titles listed below keep their period.
"""

from __future__ import annotations

import re

# What pycocoevalcap removes after tokenising (lower-cased where it compares with lower-cased tokens).
COCO_PUNCTUATION = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
UNICODE_PUNCTUATION = str.maketrans({"“": '"', "”": '"', "„": '"', "‘": "'", "’": "'", "—": " -- ", "–": " -- "})
TITLES = ("mr", "mrs", "ms", "dr", "prof", "st", "mt", "jr", "sr", "vs", "etc")
SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na")}
SPLIT_WORDS |= {"gimme": ("gim", "me"), "lemme": ("lem", "me")}
CLITICS = ("'s", "'re", "'ve", "'ll", "'m", "'d")

TOKEN_PATTERN = re.compile(
    r"(?:[^\W\d_]\.){2,}"  # dotted abbreviations: u.s. a.m.
    rf"|(?:{'|'.join(TITLES)})\.(?!\w)"  # titles keep their period
    r"|\d+(?:[.,:/]\d+)+"  # 3.5 1,000 10:30 3/4
    r"|\w+(?:[-'&/]\w+)*"  # words, hyphenated words, words with clitics (split below)
    r"|\.\.\.+|--+|[!?]+"  # ellipses, dashes, !!!
    r"|\S"  # any other symbol on its own
)


def _split_clitics(word: str) -> list[str]:
    """`doesn't` -> `does n't`, `i'd've` -> `i 'd 've`, `cannot` -> `can not` (PTB's splits)."""
    if word in SPLIT_WORDS:
        return list(SPLIT_WORDS[word])
    suffixes = []
    while True:
        clitic = next((c for c in ("n't", *CLITICS) if word.endswith(c) and len(word) > len(c)), None)
        if clitic is None:
            return [word, *reversed(suffixes)]
        suffixes.append(clitic)
        word = word[: -len(clitic)]


def ptb_tokenize(text: str) -> list[str]:
    """Tokens of a caption as the COCO caption evaluation sees them (lower-cased PTB tokens, punctuation dropped)."""
    tokens = []
    for match in TOKEN_PATTERN.finditer(text.lower().translate(UNICODE_PUNCTUATION)):
        token = match.group()
        if token[0].isalnum() and "'" in token:
            tokens.extend(_split_clitics(token))
        elif token in SPLIT_WORDS:
            tokens.extend(SPLIT_WORDS[token])
        elif token.startswith("--"):
            tokens.append("--")
        elif token.startswith("..."):
            tokens.append("...")
        else:
            tokens.append(BRACKETS.get(token, token))
    return [token for token in tokens if token not in COCO_PUNCTUATION and token != '"']
