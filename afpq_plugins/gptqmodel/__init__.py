"""GPTQModel 7.6 adapter: GPTQ and AWQ with AFPQ grids in GPTQModel workflows.

    from afpq_plugins.gptqmodel import GPTQModel, QuantizeConfig
    cfg = QuantizeConfig(bits=3, group_size=64, fmt="nf3")     # method="awq" for AWQ
    model = GPTQModel.load(path, cfg)
    model.quantize(calibration, tokenizer=tok)
    model.save(out)                                             # the project's checkpoint format

Importing this package imports nothing from gptqmodel and patches nothing; see :mod:`.api`.
"""

from __future__ import annotations

from .api import ENGINE, GPTQModel, QuantizeConfig, quantize_model, run_awq, run_gptq, supported_model_type

__all__ = ["GPTQModel", "QuantizeConfig", "quantize_model", "run_gptq", "run_awq", "supported_model_type", "ENGINE"]
