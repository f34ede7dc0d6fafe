"""The dataset and results of task ``afpq_pride_ppl`` (lm-eval loads this file by path; stdlib
and ``datasets`` only, no import of afpq_plugins)."""

from __future__ import annotations

import os
import re

_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "assets", "text", "prideprejudice.txt")


def text(chars=None) -> str:
    with open(_TEXT, encoding="utf-8") as f:
        t = f.read()
    return t if chars in (None, 0) else t[: int(chars)]


def load(chars=None, **_metadata):
    """``custom_dataset``: one test document, the novel (or its first ``chars`` characters)."""
    import datasets

    return {"test": datasets.Dataset.from_dict({"text": [text(chars)]})}


def process_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    nbytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
