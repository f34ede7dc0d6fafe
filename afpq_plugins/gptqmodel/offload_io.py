"""Reading a GPTQModel model whose tensors were offloaded, and writing it as an AFPQ checkpoint.

After a run with GPTQModel's ``offload_to_disk`` most of the model's tensors are on the meta device.
:func:`offloaded_tensor_reader` finds each one where it really is, one at a time:

- a module with accelerate's disk hook: its ``weights_map`` (the offload folder, memory-mapped);
- a tensor on the meta device without a hook (GPTQModel leaves the output head in the source):
  the source checkpoint (:class:`~afpq_plugins.core.checkpoint.CheckpointSnapshot`, strict reads);
- anything else: the tensor in memory (norms, rotary buffers).

:func:`write_offloaded` writes the checkpoint from there with the checkpoint writer (atomic,
sharded). Used by :mod:`.offloaded` (the CLI's run) and by :mod:`.api` (``model.save``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.checkpoint import CheckpointError, CheckpointSnapshot, checkpoint_writer
from ..core.checkpoint_schema import with_refusal_placeholders
from ..core.constants import LAYER_PARAM_SUFFIXES

__all__ = ["offloaded_tensor_reader", "write_offloaded"]


def _hook_weights_map(module):
    """The accelerate disk-offload ``weights_map`` of ``module``'s hook, or None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for h in getattr(hook, "hooks", None) or [hook]:
        wm = getattr(h, "weights_map", None)
        if wm is not None and getattr(h, "offload", False):
            return wm
    return None


def offloaded_tensor_reader(model, snap: Optional[CheckpointSnapshot] = None):
    """``(keys, read)`` of ``model``'s state dict where its tensors may be offloaded: ``keys``
    (state-dict order, tied duplicates dropped), ``read(key)`` the tensor on the CPU, from memory,
    the module's disk-offload map or ``snap`` (the source checkpoint). A tensor found in none of
    them is a :class:`CheckpointError` naming it."""
    from ..nn.skeleton import tied_parameter_names

    tied = tied_parameter_names(model)
    modules = dict(model.named_modules())
    sd = model.state_dict(keep_vars=True)
    keys = [k for k in sd if k not in tied]
    src_keys = set(snap.keys()) if snap is not None else set()

    def read(key: str) -> torch.Tensor:
        t = sd[key]
        if t.device.type != "meta":
            return t.detach().cpu()
        owner, _, leaf = key.rpartition(".")
        wm = _hook_weights_map(modules.get(owner))
        if wm is not None:
            try:
                return wm[leaf].detach().cpu()
            except KeyError:
                pass
        if key in src_keys:
            return snap.read(key)
        raise CheckpointError(f"tensor {key!r} ({tuple(t.shape)}, {t.dtype}) is on the meta device after "
                              "GPTQModel's run and neither its offload folder nor the source checkpoint has it")

    return keys, read


def write_offloaded(model, out_dir: str, qc, src: str, tokenizer=None, dtype: Optional[torch.dtype] = None,
                    max_shard_size=None, overwrite: bool = False):
    """Write ``model`` (GPTQModel's, after an offloaded run; AFPQ layers in place) as the AFPQ
    checkpoint ``out_dir``, one tensor at a time (:func:`offloaded_tensor_reader`; ``src``: the
    source model folder, for the tensors GPTQModel left there). ``dtype``: the float tensors
    outside the quantized layers are written in it (default: the source's commonest float dtype). Returns ``(path, bytes read)``."""
    from ..card import with_model_card
    from ..model import checkpoint_model_config, extra_files_writer
    from ..streaming import source_dtype, source_meta_model

    quant_keys = {f"{n}.{s}" for n in qc.quantized_modules for s in LAYER_PARAM_SUFFIXES}
    with CheckpointSnapshot(src) as snap:
        keys, read = offloaded_tensor_reader(model, snap)
        written = dtype or source_dtype(snap) or torch.float32
        # config.json from the source's config (as transformers reads it), not from GPTQModel's model,
        # whose config GPTQModel has rewritten for its run (Gemma 3's per-layer-type RoPE, e.g.)
        ref = source_meta_model(snap)
        ref.generation_config = getattr(model, "generation_config", None) or ref.generation_config
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        if getattr(ref.config, "pad_token_id", None) is None and pad is not None:
            ref.config.pad_token_id = pad  # GPTQModel sets it for padding calibration rows (as in memory)
        cfg_json = checkpoint_model_config(ref, qc, dtype=written)
        extra = with_model_card(extra_files_writer(ref, tokenizer, src), ref, qc, out_dir)
        placeholders = with_refusal_placeholders({}, qc.quantized_modules)
        n_read = 0
        with checkpoint_writer(out_dir, cfg_json, qc, extra_writer=extra, overwrite=overwrite,
                               max_shard_size=max_shard_size) as w:
            for key in sorted(set(keys) | set(placeholders)):
                if key in placeholders:
                    w.add(key, placeholders[key])
                    continue
                t = read(key)
                n_read += t.numel() * t.element_size()
                if t.is_floating_point() and key not in quant_keys and t.dtype != written:
                    t = t.to(written)
                w.add(key, t)
                del t
    return w.path, n_read
