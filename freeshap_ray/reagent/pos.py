"""Offline part-of-speech tagging for the POS-preserving replacement sampler.

The tagger is a greedy averaged perceptron (Penn Treebank tags). Its trained weights come from the PyPI
package ``textblob-aptagger==0.2.0`` (install extra ``pos``), read from the package directory without
importing the package (its own imports need TextBlob/NLTK) and without any download. The pickle holds
``(weights, tagdict, classes)``: ``weights[feature][tag]`` floats, ``tagdict[word]`` unambiguous tags.
Inference is re-implemented here; its feature templates are fixed by that trained model.
"""

from __future__ import annotations

import functools
import importlib.util
import pickle
from collections import defaultdict
from pathlib import Path

from ..errors import ConfigError

__all__ = ["PerceptronTagger", "TaggerMissingError", "load_tagger", "coarse_tag", "COARSE_TAGS"]

_PACKAGE = "textblob_aptagger"
_PICKLE = "trontagger-0.1.0.pickle"


class TaggerMissingError(ConfigError):
    """The offline tagger resource is not installed."""


# Penn Treebank → coarse groups (universal-tagset style). Replacement keeps the coarse group.
_COARSE = {
    "NN": "NOUN", "NNS": "NOUN", "NNP": "NOUN", "NNPS": "NOUN", "FW": "NOUN",
    "VB": "VERB", "VBD": "VERB", "VBG": "VERB", "VBN": "VERB", "VBP": "VERB", "VBZ": "VERB", "MD": "VERB",
    "JJ": "ADJ", "JJR": "ADJ", "JJS": "ADJ",
    "RB": "ADV", "RBR": "ADV", "RBS": "ADV", "WRB": "ADV",
    "PRP": "PRON", "PRP$": "PRON", "WP": "PRON", "WP$": "PRON", "EX": "PRON",
    "DT": "DET", "PDT": "DET", "WDT": "DET",
    "IN": "ADP", "TO": "PRT", "RP": "PRT", "POS": "PRT",
    "CC": "CONJ", "CD": "NUM",
    "UH": "X", "SYM": "X", "LS": "X",
}
COARSE_TAGS = ("NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "PRT", "CONJ", "NUM", "PUNCT", "X", "SPACE")


def coarse_tag(tag: str) -> str:
    return _COARSE.get(tag, "PUNCT" if tag and not tag[0].isalpha() else "X")


def _resource() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        p = Path(loc) / _PICKLE
        if p.is_file():
            return p
    raise TaggerMissingError(
        "reagent.sampler: 'pos' needs the offline tagger weights from the PyPI package textblob-aptagger==0.2.0 "
        "(pip install --no-deps 'textblob-aptagger==0.2.0', or the extra freeshap_ray[pos]); nothing is downloaded "
        "at run time. Use reagent.sampler: uniform or mlm otherwise."
    )


class PerceptronTagger:
    """Greedy averaged-perceptron POS tagger over pre-split words."""

    START = ("-START-", "-START2-")
    END = ("-END-", "-END2-")

    def __init__(self, weights: dict, tagdict: dict, classes) -> None:
        self.weights = weights
        self.tagdict = tagdict
        self.classes = sorted(classes)

    @staticmethod
    def _norm(word: str) -> str:
        if "-" in word and word[0] != "-":
            return "!HYPHEN"
        if word.isdigit() and len(word) == 4:
            return "!YEAR"
        if word[:1].isdigit():
            return "!DIGITS"
        return word.lower()

    def _predict(self, feats: list[str]) -> str:
        scores: dict[str, float] = defaultdict(float)
        for f in feats:
            w = self.weights.get(f)
            if w:
                for tag, v in w.items():
                    scores[tag] += v
        # ties resolved by tag name, so the result never depends on dict order
        return max(self.classes, key=lambda t: (scores.get(t, 0.0), t))

    def tag(self, words: list[str]) -> list[str]:
        """Penn Treebank tag of each (non-empty) word, tagged left to right in context."""
        ctx = list(self.START) + [self._norm(w) for w in words] + list(self.END)
        prev, prev2 = self.START
        out = []
        for i, word in enumerate(words):
            tag = self.tagdict.get(word)
            if not tag:
                j = i + 2
                feats = [
                    "bias", f"i suffix {word[-3:]}", f"i pref1 {word[0]}", f"i-1 tag {prev}", f"i-2 tag {prev2}",
                    f"i tag+i-2 tag {prev} {prev2}", f"i word {ctx[j]}", f"i-1 tag+i word {prev} {ctx[j]}",
                    f"i-1 word {ctx[j - 1]}", f"i-1 suffix {ctx[j - 1][-3:]}", f"i-2 word {ctx[j - 2]}",
                    f"i+1 word {ctx[j + 1]}", f"i+1 suffix {ctx[j + 1][-3:]}", f"i+2 word {ctx[j + 2]}",
                ]
                tag = self._predict(feats)
            out.append(tag)
            prev2, prev = prev, tag
        return out


@functools.lru_cache(maxsize=1)
def load_tagger() -> PerceptronTagger:
    """The offline tagger; :class:`TaggerMissingError` (naming ``reagent.sampler``) if not installed."""
    path = _resource()
    with open(path, "rb") as f:
        weights, tagdict, classes = pickle.load(f)  # plain dicts/sets shipped by the package
    return PerceptronTagger(weights, tagdict, classes)
