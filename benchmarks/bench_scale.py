"""Real-size memory and time of streaming RTN, the sharded loader and the old in-memory path.

    python benchmarks/bench_scale.py                    # ~3B Llama (hidden 3072, 28 layers), bf16
    python benchmarks/bench_scale.py --layers 4 --hidden 512 --inter 1408 --vocab 4096   # smoke run

A synthetic Llama-architecture model (random bf16 weights, N(0, 0.02); accuracy is not the
point) is written in <= ``--source-shard`` shards (transformers' layout) at full depth and at
half depth. Each measurement runs in a child process and reports its peak resident memory
(``ru_maxrss`` of the child):

* ``stream``: :func:`afpq_plugins.streaming.quantize_rtn_streaming`, nf4 g128,
  ``--max-shard-size 1GB``, at full and half depth: peak / bf16 size (bound 0.4), the two
  peaks within 10 %, MB/s of source read;
* ``load``: :func:`afpq_plugins.model.load_quantized` of the sharded result: peak / checkpoint
  size (bound 1.3);
* ``in-memory``: the old path (``from_pretrained`` in float32, ``quantize_model_rtn``,
  ``save_quantized``), at half depth (at full depth it needs about 1.3x the float32 size,
  more than this machine has);
* ``copy`` (``--copy-baseline``): a child that reads every source tensor and writes it
  unchanged in shards of the same size, right after the streaming run: the time of the I/O
  alone (it writes the bf16 bytes, ~3.3x what the nf4 checkpoint holds);
* ``baseline``: a child that only imports the same modules (the interpreter's own share of
  every peak).

``--output-search`` measures the output scale search instead (one model at ``--layers``;
calibration ``--nsamples`` x ``--calib-seqlen`` random token ids, seeded):

* ``stream-output``: :func:`~afpq_plugins.streaming.quantize_rtn_streaming` with
  ``scale_search="output"``, layer by layer (:mod:`afpq_plugins.streaming_output`);
* ``inmemory-output``: the in-memory path (``from_pretrained`` float32, the energies of one
  forward pass per sample, ``quantize_model_rtn`` with the bound searches, ``save_quantized``:
  what ``rtn.run`` does);
* the two checkpoints' tensors are compared byte for byte; ``baseline`` as above.

    python benchmarks/bench_scale.py --output-search --layers 4 --hidden 1024 --inter 2816 --heads 16 \
        --kv-heads 8 --max-shard-size 50MB

``--engines gptq awq`` measures the calibrated methods instead: ``afpq quantize --method M``
(GPTQModel with its layer offload, :mod:`afpq_plugins.gptqmodel.offloaded`) at ``--layers`` and at
half depth, each in a child; ``--engines-inmemory`` adds the in-memory engine run (the whole float32
model) at half depth and compares the two checkpoints byte for byte; ``baseline_gptqmodel`` is
the imports with GPTQModel (vocab 49152: the embedded SmolLM2 tokenizer is copied in).

    python benchmarks/bench_scale.py --engines gptq awq --engines-inmemory --layers 8 --vocab 49152 \
        --nsamples 4 --calib-seqlen 256

Writes ``benchmarks/out/scale.json`` (``--output-search``: ``scale_output.json``) and prints a markdown table; the work folder
(``--work``, default ``benchmarks/out/scale_work``) is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, os, resource, sys, time
mode, args = sys.argv[1], json.loads(sys.argv[2])
import torch
from afpq_plugins.core.spec import QuantSpec
from afpq_plugins.streaming import quantize_rtn_streaming
from afpq_plugins.model import load_quantized, quantize_model_rtn, save_quantized
out = {}
t0 = time.perf_counter()
if mode == "stream":
    r = quantize_rtn_streaming(args["src"], args["out"], QuantSpec("nf4", 128), max_shard_size=args["shard"])
    out.update(source_bytes=r.source_bytes, layers=len(r.qc.quantized_modules))
elif mode == "copy":  # the I/O floor: read every source tensor, write it unchanged in shards of the same size
    from afpq_plugins.core.checkpoint import ShardWriter
    from afpq_plugins.core.safetensors_io import open_regular, read_header, read_tensor
    os.makedirs(args["out"], exist_ok=True)
    w, n = ShardWriter(args["out"], args["shard"], {"format": "pt"}), 0
    for f in sorted(x for x in os.listdir(args["src"]) if x.endswith(".safetensors")):
        path = os.path.join(args["src"], f)
        infos, _, start = read_header(path)
        with open_regular(path) as fh:
            for k, info in infos.items():
                t = read_tensor(fh, info, start, k)
                n += t.numel() * t.element_size()
                w.add(k, t)
    w.finish()
    out.update(source_bytes=n)
elif mode == "load":
    m = load_quantized(args["src"])
    out.update(params=sum(t.numel() for t in m.state_dict().values()))
elif mode == "inmemory":
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(args["src"], dtype=torch.float32)
    qc = quantize_model_rtn(m, spec=QuantSpec("nf4", 128), progress=False)
    save_quantized(m, args["out"], qc, dtype=torch.bfloat16, max_shard_size=args["shard"])
elif mode in ("stream_output", "inmemory_output"):
    g = torch.Generator().manual_seed(args["seed"])
    samples = [torch.randint(0, args["vocab"], (args["seqlen"],), generator=g) for _ in range(args["nsamples"])]
    spec = QuantSpec("nf4", 128, scale_search="output")
    if mode == "stream_output":
        r = quantize_rtn_streaming(args["src"], args["out"], spec, max_shard_size=args["shard"], calibration=samples)
        out.update(source_bytes=r.source_bytes, layers=len(r.qc.quantized_modules))
    else:
        from transformers import AutoModelForCausalLM
        from afpq_plugins.core.output_search import BoundOutputSearch, grouped_energies, input_energies
        from afpq_plugins.model import find_linears
        m = AutoModelForCausalLM.from_pretrained(args["src"], dtype=torch.float32).eval()
        s = spec.resolved("rtn")
        lin = find_linears(m, s.skip)
        h = input_energies(m, lin, samples)
        searches = {n: BoundOutputSearch(s.scale_search, grouped_energies(e, s.group_size), name=n) for n, e in h.items()}
        qc = quantize_model_rtn(m, spec=s, layer_searches=searches, progress=False)
        save_quantized(m, args["out"], qc, dtype=torch.bfloat16, max_shard_size=args["shard"])
elif mode == "engine_inmemory":  # GPTQModel on the whole float32 model (the path before the layer offload)
    from afpq_plugins.data import load_model_and_tokenizer
    from afpq_plugins.methods import Calibration, get_method, quantize
    m, tk = load_model_and_tokenizer(args["src"], torch.float32)
    meth = get_method(args["method"], "gptqmodel")
    spec = QuantSpec("nf4", 128).resolved(args["method"])
    qc = quantize(m, tk, args["method"], spec, Calibration(args["nsamples"], args["seqlen"]).resolved(meth),
                  backend="gptqmodel", progress=False)
    save_quantized(m, args["out"], qc, tokenizer=tk, dtype=torch.bfloat16, max_shard_size=args["shard"])
elif mode == "cli":  # an afpq command line (gptq/awq: GPTQModel with its layer offload)
    from afpq_plugins import cli
    out.update(rc=cli.main(args["argv"]))
elif mode == "baseline_llama":  # the imports plus transformers' model code (loaded lazily by the runs)
    import transformers.models.llama.modeling_llama  # noqa: F401
elif mode == "baseline_gptqmodel":  # ... plus GPTQModel and its adapter (imported by --cli-methods runs)
    import transformers.models.llama.modeling_llama  # noqa: F401
    import afpq_plugins.gptqmodel, gptqmodel  # noqa: F401,E401
elif mode == "generate":
    from benchmarks.bench_scale import generate
    generate(**args)
out.update(seconds=time.perf_counter() - t0, peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print("RESULT " + json.dumps(out), flush=True)
"""


def llama_config(layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      tie_word_embeddings=False, max_position_embeddings=4096)
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    for k in ("torch_dtype", "dtype"):
        d[k] = "bfloat16"
    return d


def generate(path: str, layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int,
             shard: str, seed: int = 0) -> None:
    """Write a random bf16 Llama folder in transformers' sharded layout, one tensor at a time."""
    import torch

    from afpq_plugins.core.checkpoint import ShardWriter

    os.makedirs(path, exist_ok=True)
    cfg = llama_config(layers, hidden, inter, vocab, heads, kv_heads)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    head_dim = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)),
                   (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)),
                   (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    g = torch.Generator().manual_seed(seed)
    w = ShardWriter(path, shard, {"format": "pt"})
    for name, shape in shapes:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16)
            t.normal_(0.0, 0.02, generator=g)
        w.add(name, t)
    w.finish()


def child(mode: str, **args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))


def same_tensors(a_dir: str, b_dir: str) -> bool:
    """Every tensor of the two checkpoints the same bytes (names, dtypes, shapes, data)."""
    import torch

    from afpq_plugins.core.checkpoint import load_checkpoint_tensors

    a, b = load_checkpoint_tensors(a_dir), load_checkpoint_tensors(b_dir)
    raw = (lambda t: t.reshape(-1).view(torch.uint8) if t.numel() else t)
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(raw(a[k]), raw(b[k])) for k in a)


def finish(a, res: dict, path: str = None) -> None:
    """Remove the work folder (unless ``--keep``) and write ``res`` as JSON (``--json``, or ``path``)."""
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)
    path = path or a.json
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=2)


def copy_tokenizer(dst: str) -> None:
    """The embedded SmolLM2 tokenizer's files into the synthetic model folder (vocab 49152)."""
    from afpq_plugins.data import resolve_model
    from afpq_plugins.model import _TOKENIZER_FILES

    tok_src = str(resolve_model("default"))
    for f in _TOKENIZER_FILES:
        if f != "generation_config.json" and os.path.isfile(os.path.join(tok_src, f)):
            shutil.copyfile(os.path.join(tok_src, f), os.path.join(dst, f))


def cli_method(a, src: str, out: str, method: str) -> dict:
    """``afpq quantize SRC OUT --method METHOD`` in a child (its peak and time)."""
    r = child("cli", argv=["quantize", src, out, "--method", method, "--nsamples", str(a.nsamples),
                           "--calib-seqlen", str(a.calib_seqlen), "--max-shard-size", a.max_shard_size, "--quiet"])
    if r["rc"] != 0:
        raise SystemExit(f"afpq quantize --method {method} failed (rc {r['rc']})")
    return r


def output_search_run(a) -> int:
    """``--output-search``: the layer-by-layer output search beside the in-memory one."""
    res = {"settings": vars(a), "machine": f"{os.cpu_count()} cores", "runs": {}}
    dims = dict(hidden=a.hidden, inter=a.inter, vocab=a.vocab, heads=a.heads, kv_heads=a.kv_heads)
    calib = dict(vocab=a.vocab, nsamples=a.nsamples, seqlen=a.calib_seqlen, seed=0, shard=a.max_shard_size)
    try:
        src = os.path.join(a.work, "src")
        child("generate", path=src, layers=a.layers, shard=a.source_shard, **dims)
        bf16 = folder_bytes(src)
        print(f"source: {a.layers} layers, {bf16 / 1e9:.3f} GB bf16", flush=True)
        outs = {}
        for mode in ("stream_output", "inmemory_output"):
            outs[mode] = os.path.join(a.work, mode)
            r = child(mode, src=src, out=outs[mode], **calib)
            r.update(bf16_bytes=bf16, ratio_bf16=r["peak_bytes"] / bf16)
            res["runs"][mode] = r
            print(f"{mode}: peak {r['peak_bytes'] / 1e9:.3f} GB = {r['ratio_bf16']:.3f}x bf16, {r['seconds']:.0f}s",
                  flush=True)
        if a.cli_methods:
            copy_tokenizer(src)
        for m in a.cli_methods:
            out = os.path.join(a.work, f"cli_{m}")
            r = cli_method(a, src, out, m)
            r.update(bf16_bytes=bf16, ratio_bf16=r["peak_bytes"] / bf16)
            res["runs"][f"cli_{m}"] = r
            print(f"afpq quantize --method {m}: peak {r['peak_bytes'] / 1e9:.3f} GB = {r['ratio_bf16']:.3f}x bf16, "
                  f"{r['seconds']:.0f}s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        res["runs"]["baseline"] = child("baseline")
        res["runs"]["baseline_llama"] = child("baseline_llama")
        if a.cli_methods:
            res["runs"]["baseline_gptqmodel"] = child("baseline_gptqmodel")
            print(f"baseline with GPTQModel imported: {res['runs']['baseline_gptqmodel']['peak_bytes'] / 1e9:.3f} GB",
                  flush=True)
        res["identical"] = same_tensors(outs["stream_output"], outs["inmemory_output"])
        res["peak_ratio"] = res["runs"]["stream_output"]["peak_bytes"] / res["runs"]["inmemory_output"]["peak_bytes"]
        print(f"baseline (imports only): {res['runs']['baseline']['peak_bytes'] / 1e9:.3f} GB, with the Llama model "
              f"code {res['runs']['baseline_llama']['peak_bytes'] / 1e9:.3f} GB; layer-by-layer / "
              f"in-memory peak {res['peak_ratio']:.3f}; tensors identical: {res['identical']}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)
    path = a.json if a.json != os.path.join(ROOT, "benchmarks", "out", "scale.json") else \
        os.path.join(ROOT, "benchmarks", "out", "scale_output.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=2)
    return 0 if res["identical"] else 1


def engines_run(a) -> int:
    """``--engines M ...``: ``afpq quantize --method M`` (GPTQModel with its layer offload) at full and
    half depth, and with ``--engines-inmemory`` the in-memory engine run at half depth beside it."""
    res = {"settings": vars(a), "machine": f"{os.cpu_count()} cores", "runs": {}}
    dims = dict(hidden=a.hidden, inter=a.inter, vocab=a.vocab, heads=a.heads, kv_heads=a.kv_heads)
    try:
        depths = (("full", a.layers),) + ((("half", a.layers // 2),) if not a.single_depth else ())
        for tag, layers in depths:
            src = os.path.join(a.work, f"src_{tag}")
            child("generate", path=src, layers=layers, shard=a.source_shard, **dims)
            copy_tokenizer(src)
            bf16 = folder_bytes(src)
            print(f"[{tag}] source: {layers} layers, {bf16 / 1e9:.3f} GB bf16", flush=True)
            for m in a.engines:
                out = os.path.join(a.work, f"cli_{m}_{tag}")
                r = cli_method(a, src, out, m)
                r.update(bf16_bytes=bf16, ratio_bf16=r["peak_bytes"] / bf16, layers=layers,
                         ckpt_bytes=folder_bytes(out))
                res["runs"][f"offload_{m}_{tag}"] = r
                print(f"[{tag}] afpq quantize --method {m} (layer offload): peak {r['peak_bytes'] / 1e9:.3f} GB = "
                      f"{r['ratio_bf16']:.3f}x bf16, {r['seconds']:.0f}s", flush=True)
                if tag == "half" and a.engines_inmemory:
                    mo = os.path.join(a.work, f"mem_{m}")
                    mr = child("engine_inmemory", src=src, out=mo, method=m, nsamples=a.nsamples,
                               seqlen=a.calib_seqlen, shard=a.max_shard_size)
                    mr.update(bf16_bytes=bf16, ratio_bf16=mr["peak_bytes"] / bf16, layers=layers,
                              identical=same_tensors(out, mo))
                    res["runs"][f"inmemory_{m}_half"] = mr
                    print(f"[half] {m} in memory: peak {mr['peak_bytes'] / 1e9:.3f} GB = {mr['ratio_bf16']:.3f}x bf16, "
                          f"{mr['seconds']:.0f}s; same tensors as the offloaded run: {mr['identical']}", flush=True)
                    shutil.rmtree(mo, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
        res["runs"]["baseline_gptqmodel"] = child("baseline_gptqmodel")
        print(f"baseline (imports + Llama code + GPTQModel): "
              f"{res['runs']['baseline_gptqmodel']['peak_bytes'] / 1e9:.3f} GB", flush=True)
        for m in a.engines if not a.single_depth else ():
            f, h = res["runs"][f"offload_{m}_full"], res["runs"][f"offload_{m}_half"]
            res[f"depth_ratio_{m}"] = f["peak_bytes"] / h["peak_bytes"]
            print(f"{m}: full / half depth peak {res[f'depth_ratio_{m}']:.3f}", flush=True)
    finally:
        finish(a, res)
    return 0 if all(r.get("identical", True) for r in res["runs"].values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--inter", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--source-shard", default="5GB")
    p.add_argument("--max-shard-size", default="1GB")
    p.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "out", "scale_work"))
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "out", "scale.json"))
    p.add_argument("--skip-inmemory", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--copy-baseline", action="store_true",
                   help="also time a child that reads every source tensor and writes it unchanged in shards "
                        "(the I/O floor; it writes the bf16 bytes, more than the quantized checkpoint)")
    p.add_argument("--output-search", action="store_true",
                   help="measure the output scale search: layer by layer vs in memory (module docstring)")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--cli-methods", nargs="*", default=[],
                   help="with --output-search: also `afpq quantize --method M` for each (e.g. gptq awq; the "
                        "engine's in-memory run; needs --vocab >= 49152: the embedded SmolLM2 tokenizer is copied in)")
    p.add_argument("--engines", nargs="*", default=[],
                   help="measure `afpq quantize --method M` (GPTQModel, layer offload) at full and half depth "
                        "instead (e.g. gptq awq; --vocab 49152: the embedded SmolLM2 tokenizer is copied in)")
    p.add_argument("--engines-inmemory", action="store_true",
                   help="with --engines: also the in-memory engine run at half depth (checkpoints compared)")
    p.add_argument("--single-depth", action="store_true", help="with --engines: only at --layers (no half depth)")
    a = p.parse_args(argv)
    if os.path.exists(a.work):
        shutil.rmtree(a.work)
    os.makedirs(a.work)
    if a.output_search:
        return output_search_run(a)
    if a.engines:
        return engines_run(a)
    res = {"settings": vars(a), "machine": f"{os.cpu_count()} cores", "runs": {}}
    dims = dict(hidden=a.hidden, inter=a.inter, vocab=a.vocab, heads=a.heads, kv_heads=a.kv_heads)
    try:
        for tag, layers in (("full", a.layers), ("half", a.layers // 2)):
            src = os.path.join(a.work, f"src_{tag}")
            t = time.perf_counter()
            child("generate", path=src, layers=layers, shard=a.source_shard, **dims)
            bf16 = folder_bytes(src)
            print(f"[{tag}] source: {layers} layers, {bf16 / 1e9:.2f} GB bf16 in "
                  f"{len([n for n in os.listdir(src) if n.endswith('.safetensors')])} file(s), "
                  f"written in {time.perf_counter() - t:.0f}s", flush=True)
            out = os.path.join(a.work, f"q_{tag}")
            r = child("stream", src=src, out=out, shard=a.max_shard_size)
            r.update(bf16_bytes=bf16, ckpt_bytes=folder_bytes(out), layers=layers)
            r["ratio_bf16"] = r["peak_bytes"] / bf16
            r["mb_per_s"] = r["source_bytes"] / 1e6 / r["seconds"]
            res["runs"][f"stream_{tag}"] = r
            print(f"[{tag}] stream: peak {r['peak_bytes'] / 1e9:.2f} GB = {r['ratio_bf16']:.3f}x bf16, "
                  f"{r['seconds']:.0f}s, {r['mb_per_s']:.1f} MB/s of source", flush=True)
            if a.copy_baseline:  # the same bytes read and written without quantizing, right after
                cr = child("copy", src=src, out=os.path.join(a.work, f"copy_{tag}"), shard=a.max_shard_size)
                cr.update(mb_per_s=cr["source_bytes"] / 1e6 / cr["seconds"], stream_over_copy=r["seconds"] / cr["seconds"])
                res["runs"][f"copy_{tag}"] = cr
                shutil.rmtree(os.path.join(a.work, f"copy_{tag}"), ignore_errors=True)
                print(f"[{tag}] copy (read + write unchanged): {cr['seconds']:.0f}s, {cr['mb_per_s']:.1f} MB/s; "
                      f"streaming RTN / copy = {cr['stream_over_copy']:.2f}x", flush=True)
            if tag == "full":
                lr = child("load", src=out)
                lr.update(ckpt_bytes=r["ckpt_bytes"], ratio_ckpt=lr["peak_bytes"] / r["ckpt_bytes"])
                res["runs"]["load_full"] = lr
                print(f"[full] load_quantized: peak {lr['peak_bytes'] / 1e9:.2f} GB = {lr['ratio_ckpt']:.3f}x the "
                      f"checkpoint ({r['ckpt_bytes'] / 1e9:.2f} GB), {lr['seconds']:.0f}s", flush=True)
                shutil.rmtree(src)
            elif not a.skip_inmemory:
                mr = child("inmemory", src=src, out=os.path.join(a.work, "mem_half"), shard=a.max_shard_size)
                mr.update(bf16_bytes=bf16, ratio_bf16=mr["peak_bytes"] / bf16, layers=layers)
                res["runs"]["inmemory_half"] = mr
                print(f"[half] in-memory: peak {mr['peak_bytes'] / 1e9:.2f} GB = {mr['ratio_bf16']:.3f}x bf16, "
                      f"{mr['seconds']:.0f}s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        base = child("baseline")
        res["runs"]["baseline"] = base
        f, h = res["runs"]["stream_full"], res["runs"]["stream_half"]
        res["depth_ratio"] = f["peak_bytes"] / h["peak_bytes"]
        res["checks"] = {"stream <= 0.4x bf16": f["ratio_bf16"] <= 0.4,
                         "half depth within 10%": abs(res["depth_ratio"] - 1) <= 0.10,
                         "load <= 1.3x checkpoint": res["runs"]["load_full"]["ratio_ckpt"] <= 1.3}
        print(f"baseline (imports only): {base['peak_bytes'] / 1e9:.2f} GB; full/half stream peak "
              f"{res['depth_ratio']:.3f}; checks {res['checks']}")
    finally:
        finish(a, res)
    return 0 if all(res["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
