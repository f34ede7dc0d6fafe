"""The AFPQ block update registered with llm-compressor 0.14 (``gptq_block_update``): its column
path (core's ``ColumnQuantizer`` tables, one per group in the block) against the same GPTQ loop
written out with core's ``decode(encode())`` per column, bit for bit, on random blocks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llmcompressor")

from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.utils.impl_backend import ImplBackend  # noqa: E402

from afpq_plugins.core.formats import get_format  # noqa: E402
from afpq_plugins.core.quantize import decode, encode, find_params, round_params  # noqa: E402
from afpq_plugins.llmcompressor import gptq as lc  # noqa: E402


def _reference(W1, Hinv1, p1, p2, fmt, mode, i1, gs):
    """GPTQ's column loop (llm-compressor's eager update) with decode(encode()) of each column."""
    W1, Q1 = W1.clone(), torch.zeros_like(W1)
    Err1, losses1 = torch.zeros_like(W1), torch.zeros_like(W1)
    for i in range(W1.shape[-1]):
        g = (i1 + i) // gs
        c1, c2 = p1[..., g], p2[..., g]
        w = W1[:, :, i]
        q = decode(encode(w, fmt, mode, c1, c2), fmt, mode, c1, c2, w.dtype)
        error = (w - q) / Hinv1[:, i, i][:, None]
        Q1[:, :, i], Err1[:, :, i], losses1[:, :, i] = q, error, error.square()
        W1[:, :, i:] -= error.unsqueeze(-1) * Hinv1[:, i, i:].unsqueeze(1)
    return W1, Q1, Err1, losses1


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("fp4", "afpq"), ("nf4", "sym"), ("int3", "zp"), ("nf3", "zp")])
def test_block_update_equals_decode_encode_loop(fmt, mode):
    lc._register_block_update()
    update = ImplBackend._fn_registry["afpq_gptq_block_update"]
    g = torch.Generator().manual_seed(0)
    rows, cols, gs, width, i1 = 48, 256, 32, 64, 128
    W = torch.randn(1, rows, cols, generator=g) * 0.05
    W[:, 3] = -W[:, 3].abs()  # a row with no positive weight: s_pos = 0
    f = get_format(fmt)
    p1, p2 = round_params(*find_params(W[0].reshape(rows, -1, gs), f, mode), mode=mode)
    p1, p2 = p1[..., 0][None], p2[..., 0][None]  # [1, rows, groups]
    A = torch.randn(width, width, generator=g, dtype=torch.float64)
    Hinv1 = torch.linalg.cholesky(torch.linalg.inv(A @ A.T / width + torch.eye(width, dtype=torch.float64)),
                                  upper=True).float()[None]
    W1 = W[:, :, i1:i1 + width].clone()
    ref = _reference(W1, Hinv1, p1, p2, f, mode, i1, gs)
    Q1, Err1, losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
    qa = QuantizationArgs(num_bits=f.bits, type="int", symmetric=False, strategy="group", group_size=gs)
    g_idx = (torch.arange(cols) // gs)[None]
    token = lc._ACTIVE.set((f, mode))
    try:
        update(W1, Hinv1, Q1, Err1, losses1, scale=p1, zero_point=p2, global_scale=None, g_idx=g_idx,
               quant_args=qa, i1=i1)
    finally:
        lc._ACTIVE.reset(token)
    for got, want in zip((W1, Q1, Err1, losses1), ref):
        assert torch.equal(got, want)


def test_group_starts():
    p1 = torch.tensor([[[1.0, 1.0, 2.0, 2.0, 2.0, 1.0]], [[1.0, 1.0, 2.0, 2.0, 3.0, 1.0]]])
    p2 = torch.zeros_like(p1)
    assert lc._group_starts(p1, p2) == [0, 0, 2, 2, 4, 5]  # every row and batch item must agree
    p2b = p2.clone()
    p2b[..., 1] = 1.0
    assert lc._group_starts(p1, p2b) == [0, 1, 2, 2, 4, 5]
