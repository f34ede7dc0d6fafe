"""Perplexity with the WikiText-2 protocol of the GPTQ and AFPQ papers.

The protocol: tokenize the whole evaluation text once, cut the token stream into
non-overlapping windows of ``seqlen`` tokens (the tail that does not fill a window
is dropped), run each window through the model on its own (no context carried
across windows), and score every token of a window from the tokens before it in
that window. A window of ``seqlen`` tokens therefore predicts ``seqlen - 1``
tokens, and the perplexity is ``exp`` of the mean negative log-likelihood over
all predicted tokens. (The papers' code writes this as
``exp(sum(mean_nll_i * seqlen) / (n * seqlen))``; since every window predicts the
same number of tokens, that equals the mean over all predicted tokens.)

Special tokens: the text is tokenized by calling the tokenizer with its defaults,
exactly as the papers' code does (``tokenizer(text)``). A tokenizer that adds a
BOS token (Llama 2) puts one BOS at the very start of the stream, which then
belongs to the first window; a byte-level BPE such as the default SmolLM2
tokenizer adds nothing. No per-window BOS is inserted.

Uncertainty: every result carries the mean NLL of each window (``window_nll``) and a
standard error computed from them, treating the windows as independent samples of the
text: ``nll_se = stdev(window_nll) / sqrt(windows)`` and, by the delta method,
``ppl_se = ppl * nll_se``. Two models scored on the same windows are compared with
:func:`paired_difference`, whose error is that of the per-window differences (the shared
difficulty of each window cancels); :func:`combined_se` is the unpaired combination
``sqrt(se_a^2 + se_b^2)``, more conservative.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from afpq_plugins.data import eval_text_path, load_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PerplexityResult", "perplexity", "token_windows", "window_se", "paired_difference", "combined_se",
           "compare"]


@dataclass(frozen=True)
class PerplexityResult:
    """The outcome of :func:`perplexity`.

    Attributes:
        ppl: ``exp(nll)``.
        nll: mean negative log-likelihood per predicted token, in nats.
        tokens: number of predicted tokens, ``windows * (seqlen - 1)``.
        windows: number of windows evaluated.
        seqlen: tokens per window.
        seconds: wall time of the forward passes (tokenization excluded).
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float
    window_nll: tuple = ()
    nll_se: float | None = None
    ppl_se: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON)."""
        d = asdict(self)
        d["window_nll"] = list(self.window_nll)
        return d


def window_se(window_nll: Sequence[float]) -> float | None:
    """Standard error of the mean NLL from the per-window means (None for fewer than 2 windows)."""
    n = len(window_nll)
    if n < 2:
        return None
    mean = math.fsum(window_nll) / n
    var = math.fsum((x - mean) ** 2 for x in window_nll) / (n - 1)
    return math.sqrt(var / n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """``(mean NLL of a - mean NLL of b, its standard error)`` over the same windows, paired."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} windows (need the same, at least 1)")
    d = [x - y for x, y in zip(a, b)]
    return math.fsum(d) / len(d), window_se(d)


def combined_se(se_a: float | None, se_b: float | None) -> float | None:
    """``sqrt(se_a^2 + se_b^2)``: the unpaired error of a difference (None if either is unknown)."""
    if se_a is None or se_b is None:
        return None
    return math.sqrt(se_a * se_a + se_b * se_b)


def compare(a: dict, b: dict) -> dict:
    """``a`` against ``b`` (two results' dicts on the same windows): the perplexity ratio
    ``exp(nll_a - nll_b)``, the paired NLL difference and its error, the unpaired combined
    error of the perplexities, and the verdict: ``"a"``/``"b"`` (lower, by more than the
    paired error) or ``"tie"``."""
    diff, se = paired_difference(a["window_nll"], b["window_nll"])
    verdict = "tie" if se is None or abs(diff) <= se else ("a" if diff < 0 else "b")
    return {"ratio": math.exp(diff), "nll_diff": diff, "nll_diff_se": se,
            "ppl_diff": a["ppl"] - b["ppl"], "ppl_combined_se": combined_se(a.get("ppl_se"), b.get("ppl_se")),
            "winner": verdict}


def token_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into non-overlapping windows of ``seqlen`` tokens.

    The tail remainder (``len(ids) % seqlen`` tokens) is dropped; ``windows`` keeps
    at most that many leading windows.

    Returns:
        A ``[n, seqlen]`` view of ``ids``.

    Raises:
        ValueError: if ``seqlen < 2``, ``windows < 1``, or ``ids`` holds fewer than
            ``seqlen`` tokens.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 to predict a token, got {seqlen}")
    if windows is not None and windows < 1:
        raise ValueError(f"windows must be at least 1 (or None for all), got {windows}")
    ntokens = ids.numel()
    available = ntokens // seqlen
    if available < 1:
        raise ValueError(
            f"the text gives {ntokens} tokens, fewer than one window of seqlen={seqlen}"
        )
    count = available if windows is None else min(windows, available)
    return ids[: count * seqlen].view(count, seqlen)


def perplexity(
    model: torch.nn.Module,
    tokenizer_or_ids: PreTrainedTokenizerBase | torch.Tensor | Sequence[int],
    text: str | None = None,
    seqlen: int = 1024,
    windows: int | None = None,
    progress: bool = True,
    batch_size: int = 1,
) -> PerplexityResult:
    """Perplexity of a causal LM over non-overlapping windows (see the module docstring).

    Args:
        model: a causal LM whose ``forward(input_ids=..., use_cache=False)`` returns an
            object with ``.logits`` (any Hugging Face ``*ForCausalLM``). It is run in
            eval mode under :func:`torch.inference_mode` on the device of its first
            parameter; its training mode is restored afterwards.
        tokenizer_or_ids: a tokenizer, or the token ids of the whole text (a 1-D tensor,
            a ``[1, n]`` tensor, or a sequence of ints).
        text: the text to tokenize when a tokenizer is given; ``None`` means the
            embedded evaluation text (*Pride and Prejudice*). Must be ``None`` when ids
            are given.
        seqlen: tokens per window.
        windows: evaluate at most this many leading windows; ``None`` means all.
        progress: show a tqdm progress bar on stderr.
        batch_size: windows per forward pass (all windows have the same length, so
            no padding is involved and the result does not depend on it beyond
            floating-point rounding).

    Raises:
        ValueError: on bad arguments, or if the text gives fewer than ``seqlen`` tokens.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ids = _token_ids(tokenizer_or_ids, text)
    chunks = token_windows(ids, seqlen, windows)
    device = _model_device(model)
    total_nll = torch.zeros((), dtype=torch.float64)
    per_window: list[float] = []
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode(), tqdm(
            total=len(chunks),
            desc=f"perplexity (seqlen {seqlen})",
            unit="window",
            file=sys.stderr,
            disable=not progress,
        ) as bar:
            for batch in chunks.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                nll = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(),
                    batch[:, 1:].flatten(),
                    reduction="none",
                )
                nll = nll.double().view(len(batch), seqlen - 1)
                total_nll += nll.sum().cpu()
                per_window.extend(nll.mean(1).cpu().tolist())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    tokens = chunks.shape[0] * (seqlen - 1)
    mean_nll = total_nll.item() / tokens
    se = window_se(per_window)
    ppl = math.exp(mean_nll)
    return PerplexityResult(
        ppl=ppl,
        nll=mean_nll,
        tokens=tokens,
        windows=chunks.shape[0],
        seqlen=seqlen,
        seconds=seconds,
        window_nll=tuple(per_window),
        nll_se=se,
        ppl_se=None if se is None else ppl * se,
    )


def _token_ids(
    tokenizer_or_ids: PreTrainedTokenizerBase | torch.Tensor | Sequence[int], text: str | None
) -> torch.Tensor:
    """The whole text as a 1-D ``torch.long`` tensor of token ids."""
    if isinstance(tokenizer_or_ids, (torch.Tensor, Sequence)) and not isinstance(
        tokenizer_or_ids, str
    ):
        if text is not None:
            raise ValueError("pass either token ids or a tokenizer with text, not ids and text")
        ids = torch.as_tensor(tokenizer_or_ids, dtype=torch.long)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(
                f"token ids must be 1-D or of shape [1, n], got shape {tuple(ids.shape)}"
            )
        return ids
    if text is None:
        text = load_text(eval_text_path())
    return tokenizer_or_ids(text, return_tensors="pt")["input_ids"][0]


def _model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer, for a fully quantized model); CPU if none."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
