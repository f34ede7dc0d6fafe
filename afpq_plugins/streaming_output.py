"""The output scale search (``--scale-search output``) of streaming RTN: one decoder layer at a time.

The output search weighs each Linear's group errors by the energies of its calibration
inputs, ``diag(X^T X)``; the in-memory path (:func:`afpq_plugins.rtn.run`) gets them from
one forward pass of the whole float model. Here, as the GPTQ engines onload:

1. the embeddings (and whatever else runs before the first decoder layer) are read from
   the source; each calibration sample goes through the model until the first decoder
   layer, whose inputs (hidden states and keyword arguments: position embeddings, mask,
   positions) are captured, and the embeddings are freed;
2. for each decoder layer: its tensors are read from the source (one at a time, ``pread``),
   the captured inputs run through it with forward pre-hooks on its Linears accumulating
   the energies with :func:`~afpq_plugins.core.output_search.input_energies`' hooks (same
   samples, same order, same float32 sums), each Linear is quantized with the output search
   bound to its energies (:meth:`AFPQLinear.from_linear`, the in-memory path's call), its
   tensors go to the output shards and the layer is freed;
3. a quantized output head gets the energies of the final norm's output.

**Which activations propagate**: the *float* layer's outputs, as in the in-memory path,
whose single forward pass sees only float layers. So the checkpoint is the in-memory
output search's, byte for byte (tested). (GPTQ propagates the quantized layer's outputs;
that is a different method, and not what the output search was studied with.)

Peak memory: one decoder layer in the compute dtype (float32), its quantization
temporaries, the output shard being filled, and the calibration activations twice (a
layer's inputs and outputs: ``2 x nsamples x seqlen x hidden`` floats, plus the captured
keyword tensors); during the capture, the input embedding as stored (e.g. bfloat16; its
lookups are cast to the compute dtype, the same values as a float32 embedding's) instead of
the layer.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .core.quantize import check_finite

__all__ = ["LayerPlan", "plan_layers", "capture", "run_layers"]


class _Captured(Exception):
    """Raised by the first decoder layer's pre-hook once its inputs are recorded."""


class LayerPlan:
    """Where the decoder layers are, and what runs around them (checked before any write)."""

    def __init__(self, model: nn.Module, prefix: str, layers: nn.ModuleList, head: Optional[str],
                 head_norm: Optional[str]):
        self.model, self.prefix, self.layers, self.head, self.head_norm = model, prefix, layers, head, head_norm

    def layer_of(self, key: str) -> Optional[int]:
        """Index of the decoder layer holding state-dict ``key`` (None: outside the layers)."""
        p = self.prefix + "."
        if not key.startswith(p):
            return None
        i = key[len(p):].split(".", 1)[0]
        return int(i) if i.isdigit() else None


def _skeleton(config) -> nn.Module:
    """The model with its parameters on the meta device and its buffers real (rotary
    frequencies are computed at construction)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return model.eval()


def plan_layers(config, names: Sequence[str], not_streamable: Callable[[str], Exception]) -> LayerPlan:
    """The decoder layers (the ``nn.ModuleList`` holding most of the quantized Linears) of the
    model of ``config``; a quantized Linear outside them must be the output head with a final
    norm before it, and the layers must all be of one type (``layer_types``: sliding-window
    and full-attention layers get different masks); ``not_streamable`` otherwise."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = sorted(set(getattr(text, "layer_types", None) or ()))
    if len(types) > 1:  # each type gets its own mask (and rotary): one captured set of inputs cannot serve all
        raise not_streamable(f"its decoder layers are of {len(types)} types ({', '.join(types)}), each with its own "
                             "attention mask: layer-by-layer replay of the first layer's inputs would be wrong")
    model = _skeleton(config)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    best = max(lists, key=lambda nm: sum(1 for q in names if q.startswith(nm[0] + ".")), default=None)
    if best is None or not any(q.startswith(best[0] + ".") for q in names):
        raise not_streamable("no decoder layers (an nn.ModuleList) hold the quantized Linears")
    prefix, layers = best
    for buf_name, buf in model.named_buffers():
        if buf.is_meta:
            raise not_streamable(f"buffer {buf_name!r} cannot be built without the weights")
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((n for n, m in model.named_modules() if m is out), None) if out is not None else None
    head_norm = None
    for q in names:
        if q.startswith(prefix + "."):
            continue
        if q != head:
            raise not_streamable(f"quantized Linear {q!r} is outside the decoder layers ({prefix}) and is not "
                                 "the output head")
        dec = model.get_decoder() if hasattr(model, "get_decoder") else None
        norm = getattr(dec, "norm", None) if dec is not None else None
        head_norm = next((n for n, m in model.named_modules() if m is norm), None) if norm is not None else None
        if head_norm is None:
            raise not_streamable(f"quantized output head {q!r} without a final norm ('norm') to calibrate it")
    return LayerPlan(model, prefix, layers, head, head_norm)


def _assign(model: nn.Module, key: str, t: torch.Tensor) -> None:
    parent, _, leaf = key.rpartition(".")
    mod = model.get_submodule(parent) if parent else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[leaf] = t


def _unload(model: nn.Module, keys) -> None:
    for k in keys:
        parent, _, leaf = k.rpartition(".")
        mod = model.get_submodule(parent) if parent else model
        if leaf in mod._parameters:
            p = mod._parameters[leaf]
            mod._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        elif leaf in mod._buffers:
            mod._buffers[leaf] = torch.empty_like(mod._buffers[leaf], device="meta")


def capture(plan: LayerPlan, snap, mapping: Dict[str, str], samples: Sequence[torch.Tensor], *, device="cpu",
            compute_dtype: torch.dtype = torch.float32) -> list:
    """Step 1: ``[(hidden, kwargs)]`` per sample, the first decoder layer's inputs."""
    model = plan.model
    outside = [k for k in model.state_dict() if plan.layer_of(k) is None and k in mapping
               and not (plan.head is not None and k.startswith(plan.head + "."))]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_key = next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None) if emb is not None else None
    for k in outside:
        raw = snap.read(mapping[k])
        if k == emb_key and raw.is_floating_point():  # kept as stored; its lookups are cast (same values)
            _assign(model, k, raw.to(device))
        else:
            _assign(model, k, raw.to(device=device, dtype=compute_dtype))
        del raw
    for mod in model.modules():  # the real buffers (rotary frequencies) to the device; parameters stay meta
        for bn, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta:
                mod._buffers[bn] = b.to(device)
    got: list = []

    def grab(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        got.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    h = plan.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    cast = emb.register_forward_hook(lambda mod, args, y: y.to(compute_dtype)) if emb_key is not None else None
    try:
        with torch.no_grad():
            for s in samples:
                s = torch.as_tensor(s)
                try:
                    model(s.reshape(1, -1).to(device) if s.dim() == 1 else s.to(device), use_cache=False)
                except _Captured:
                    continue
                raise RuntimeError(f"the first decoder layer ({plan.prefix}.0) was not called in the forward pass")
    finally:
        h.remove()
        if cast is not None:
            cast.remove()
        _unload(model, outside)
    return got


def run_layers(plan: LayerPlan, snap, mapping, weight_of, geometry, spec, captured: list,
               add: Callable[[str, torch.Tensor], None], *, dtype=None, device="cpu",
               compute_dtype: torch.dtype = torch.float32, progress: bool = False) -> None:
    """Steps 2 and 3 (module docstring): every tensor of the decoder layers and the head."""
    from .core.checkpoint import with_refusal_placeholders
    from .core.output_search import BoundOutputSearch, energy_hooks, grouped_energies
    from .nn import AFPQLinear

    model = plan.model
    keys_of: Dict[int, List[str]] = {}
    for k in mapping:
        i = plan.layer_of(k)
        if i is not None:
            keys_of.setdefault(i, []).append(k)
    hidden = [h for h, _ in captured]
    kwargs = [kw for _, kw in captured]
    it = range(len(plan.layers))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"RTN (layer by layer, output search) {spec.describe()}", unit="layer")

    def quantize(name: str, key: str, w: torch.Tensor, energies: torch.Tensor):
        check_finite(w, key)
        lp = geometry[name]
        lin = nn.Linear(lp.in_features, lp.out_features, bias=False, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        search = BoundOutputSearch(spec.scale_search, grouped_energies(energies, spec.group_size), name=name)
        layer = AFPQLinear.from_linear(lin, name=name, search=search, spec=spec, geometry=lp.geometry)
        tensors = {f"{name}.{k}": v.detach().cpu() for k, v in layer.state_dict().items()}
        for k, v in sorted(with_refusal_placeholders(tensors, [name]).items()):
            add(k, v)

    for i in it:
        layer = plan.layers[i]
        keys = sorted(keys_of.get(i, ()))
        weights = {}
        for k in keys:
            raw = snap.read(mapping[k])
            if k in weight_of:
                weights[k] = raw.to(device=device, dtype=torch.float32)
                _assign(model, k, weights[k] if compute_dtype == torch.float32 else raw.to(device, compute_dtype))
            else:
                add(k, raw.to(dtype) if dtype is not None and raw.is_floating_point() else raw)
                _assign(model, k, raw.to(device=device, dtype=compute_dtype) if raw.is_floating_point()
                        else raw.to(device))
            del raw
        qnames = {weight_of[k]: k for k in keys if k in weight_of}
        with energy_hooks({n: model.get_submodule(n) for n in qnames}) as acc, torch.no_grad():
            out = []
            for x, kw in zip(hidden, kwargs):
                y = layer(x, **kw)
                out.append(y[0] if isinstance(y, (tuple, list)) else y)
        hidden = out
        for name, key in qnames.items():
            quantize(name, key, weights.pop(key), acc.pop(name))
        _unload(model, keys)
        del weights
    if plan.head is not None and f"{plan.head}.weight" in weight_of:
        norm_keys = [k for k in mapping if k.startswith(plan.head_norm + ".")]
        for k in norm_keys:
            _assign(model, k, snap.read(mapping[k]).to(device=device, dtype=compute_dtype))
        norm = model.get_submodule(plan.head_norm)
        acc = {}
        with torch.no_grad():
            for x in hidden:
                y = norm(x).detach().reshape(-1, x.shape[-1]).float()
                v = (y * y).sum(0)
                acc["h"] = acc["h"] + v if "h" in acc else v
        _unload(model, norm_keys)
        key = f"{plan.head}.weight"
        quantize(plan.head, key, snap.read(mapping[key]).to(device=device, dtype=torch.float32), acc["h"])
