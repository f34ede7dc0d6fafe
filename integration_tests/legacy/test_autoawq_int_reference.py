"""Stock AutoAWQ 0.2.9 INT AWQ on a tiny model; writes the quantized state dict.

Used by ``test_autoawq_adapter.py::test_int_awq_unchanged``, in a subprocess that never
imports ``afpq_plugins`` and in the test process after an AFPQ run: both must agree
bit for bit. ``python test_autoawq_int_reference.py MODEL_DIR OUT_FILE [--import-afpq]``.
"""

import sys
import warnings

import torch

CALIB_SEQLEN = 64
CALIB_SAMPLES = 8


def calib_ids(tok_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = open(f"{tok_dir}/calib.txt", encoding="utf-8").read()
    ids = tok.encode(text)
    return [ids[i : i + CALIB_SEQLEN] for i in range(0, CALIB_SEQLEN * CALIB_SAMPLES, CALIB_SEQLEN)], tok


def run(model_dir: str) -> dict:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from awq import AutoAWQForCausalLM

        model = AutoAWQForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, device_map=None)
    calib, tok = calib_ids(model_dir)
    model.quantize(
        tok, quant_config={"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "gemm"},
        calib_data=calib, max_calib_samples=CALIB_SAMPLES, max_calib_seq_len=CALIB_SEQLEN,
    )
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


if __name__ == "__main__":
    if "--import-afpq" in sys.argv:
        import afpq_plugins.autoawq.quantizer  # noqa: F401
    sd = run(sys.argv[1])
    assert "afpq_plugins" not in sys.modules or "--import-afpq" in sys.argv
    torch.save(sd, sys.argv[2])
