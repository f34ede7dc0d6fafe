"""lm-eval-harness tasks shipped with afpq-plugins (offline: the embedded texts).

``afpq_pride_ppl``: perplexity (``loglikelihood_rolling``) over *Pride and Prejudice*, the text
``afpq eval`` uses, as one document. Point lm-eval at this folder::

    lm_eval --model hf --model_args pretrained=CKPT,max_length=1024 \\
        --tasks afpq_pride_ppl --include_path "$(python -m afpq_plugins.lm_eval_tasks)"

lm-eval reports word and byte perplexity and bits per byte; :func:`token_perplexity` turns its
word perplexity into the token perplexity ``afpq eval --seqlen 1024`` prints (same text, same
non-overlapping windows; lm-eval also scores the first token of each window, from one token of
context, and the last partial window, so the two agree to within about 1% on long texts:
docs/lm_eval.md). ``--metadata '{"chars": N}'`` keeps the first N characters (quick runs).
"""

from __future__ import annotations

import math
import os
import re

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
TASK = "afpq_pride_ppl"

__all__ = ["TASKS_DIR", "TASK", "token_perplexity", "word_count"]


def word_count(text: str) -> int:
    """Words as lm-eval's perplexity tasks count them (``re.split(r"\\s+", text)``)."""
    return len(re.split(r"\s+", text))


def token_perplexity(word_perplexity: float, text: str, n_tokens: int) -> float:
    """Token perplexity from lm-eval's ``word_perplexity`` of one document ``text`` of ``n_tokens``
    tokens (lm-eval scores every token of the document)."""
    total_nll = math.log(word_perplexity) * word_count(text)
    return math.exp(total_nll / n_tokens)
