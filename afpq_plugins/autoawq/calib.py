"""Calibration data for AutoAWQ without a dataset download.

AutoAWQ 0.2.9's ``get_calib_dataset`` accepts a list of strings or a list of lists
of token ids, but silently *drops* every string longer than ``max_calib_seq_len``
tokens, concatenates the rest and cuts the stream into ``max_seq_len`` blocks
(the tail is dropped; fewer than one block is a bare ``torch.cat`` error).
:func:`calibration_token_lists` turns what users have (``"austen"``, strings,
token-id tensors or lists) into lists of ints no longer than ``seqlen``, so
nothing is dropped and the sample count is what was asked for.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch

__all__ = ["AUSTEN", "calibration_token_lists"]

#: ``calib_data="austen"``: the embedded Austen calibration novels
#: (:func:`afpq_plugins.data.calibration_samples`, seeded random windows).
AUSTEN = "austen"


def _ids(x) -> List[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() == 2 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 1 or x.is_floating_point():
            raise ValueError(f"calibration token ids must be a 1-D integer tensor, got {x.dtype} {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


def calibration_token_lists(
    data: Union[str, Sequence], tokenizer, n_samples: int, seqlen: int, seed: int = 0
) -> Union[str, List[List[int]]]:
    """Normalise ``calib_data`` for AutoAWQ (see the module docstring).

    * ``"austen"``: ``n_samples`` windows of ``seqlen`` tokens of the embedded Austen text.
    * a list of strings: each tokenized (``tokenizer.encode``, as AutoAWQ does) and cut
      into pieces of at most ``seqlen`` tokens (AutoAWQ would drop long strings).
    * a 2-D tensor, or a list of 1-D tensors / lists of ints: token ids, cut likewise.
    * any other string: returned unchanged (a Hugging Face dataset name, which AutoAWQ
      downloads).

    Raises ``ValueError`` when the data holds fewer than ``seqlen`` tokens in total.
    """
    if isinstance(data, str):
        if data.lower() != AUSTEN:
            return data
        from ..data import calibration_samples

        return [_ids(s) for s in calibration_samples(tokenizer, n_samples, seqlen, seed=seed)]
    if isinstance(data, torch.Tensor):
        data = list(data) if data.dim() == 2 else [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise ValueError("calib_data must be 'austen', a dataset name, or a non-empty list of strings or token ids")
    out: List[List[int]] = []
    for item in data:
        ids = tokenizer.encode(item.strip()) if isinstance(item, str) else _ids(item)
        out.extend(ids[i : i + seqlen] for i in range(0, len(ids), seqlen))
    out = [x for x in out if x]
    total = sum(len(x) for x in out)
    if total < seqlen:
        raise ValueError(
            f"calibration data holds {total} tokens, fewer than one block of max_calib_seq_len={seqlen}"
        )
    return out
