"""GGUF -> HF model directory that transformers and `Backbone` load with the same logits.

    bsharedrag import-gguf model.Q4_K_M.gguf OUT_DIR [--dtype bfloat16]

The tensors are dequantized by transformers' GGUF reader (which uses the `gguf` package's
numpy dequantizers and undoes llama.cpp's q/k row permutation), so every quantization type
gguf can dequantize is accepted; the header is checked first, and an architecture or a
quantization type we cannot take is a one-line error naming it, before minutes of work.

OUT gets config.json, model.safetensors (float32 or bfloat16/float16), tokenizer.json,
tokenizer_config.json (special tokens and the chat template), generation_config.json
(BOS / EOS / pad ids) and gguf_source.json: the source's size and sha256 and the sha256 of
every file written, which `model_store` checks before it trusts a cached conversion.
The directory appears whole or not at all (built beside OUT, then renamed).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

from .fingerprint import sha256_file

MANIFEST = "gguf_source.json"
# GGUF general.architecture, and the model_type transformers reads it as -> the HF class our
# Backbone implements. llama.cpp writes Mistral models as "llama" (and runs them so, without
# a sliding window): they import as LlamaForCausalLM, the same computation. No "mistral": gguf
# (so transformers' reader) has no such architecture, a file claiming it fails after inspection.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
OUT_DTYPES = ("float32", "bfloat16", "float16")
# PretrainedConfig.to_dict() fields of every model class that say nothing about this one
_GENERIC_KEYS = ("id2label", "label2id", "output_hidden_states", "output_attentions", "return_dict",
                 "chunk_size_feed_forward", "is_encoder_decoder", "problem_type")


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def _dequantizable(gguf, qtype) -> bool:
    """Whether the installed gguf package dequantizes this type (probed on one zero block)."""
    import numpy as np

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


def inspect_gguf(src: str) -> dict:
    """The header facts the import depends on: {"architecture", "name", "quant_types", "file_type",
    "stop_ids"}.
    Not a GGUF file, an architecture we do not implement, or a quantization type that
    cannot be dequantized: a ValueError naming the file and what is wrong."""
    gguf = _require_gguf()
    if not os.path.isfile(src):
        raise FileNotFoundError(f"no GGUF file at {src!r}")
    try:
        reader = gguf.GGUFReader(src)
    except Exception as e:  # the reader raises ValueError / struct errors / IndexError on garbage
        raise ValueError(f"{src}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key: str):
        f = reader.fields.get(key)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode("utf-8", "replace") if f.types[0] == gguf.GGUFValueType.STRING else int(value[0])

    arch = field("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{src}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    types: dict = {}
    for t in reader.tensors:
        types.setdefault(t.tensor_type, t.name)
    bad = {qt.name: name for qt, name in types.items() if not _dequantizable(gguf, qt)}
    if bad:
        listed = ", ".join(f"{q} (e.g. tensor {n})" for q, n in sorted(bad.items()))
        raise ValueError(f"{src}: quantization type {listed} is not supported (the gguf package cannot dequantize it)")
    stops = [field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    ft = field("general.file_type")
    try:  # llama.cpp's name of the file's type (Q4_1 holds Q8_0 and F32 tensors too)
        file_type = gguf.LlamaFileType(ft).name.replace("MOSTLY_", "").replace("ALL_", "")
    except ValueError:
        file_type = "+".join(sorted(q.name for q in types))
    return {"architecture": arch, "name": field("general.name"), "quant_types": sorted(q.name for q in types),
            "file_type": file_type, "stop_ids": sorted({i for i in stops if i is not None})}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _convert(src: str, out: str, dtype: str, info: dict) -> None:
    """Dequantize src with transformers and write every file of the HF directory into out."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("import-gguf dequantizes through transformers: pip install transformers gguf") from None

    # transformers also reads config / tokenizer files that sit beside the GGUF file: load it
    # from a folder that holds nothing else
    folder, name = tempfile.mkdtemp(prefix="bsharedrag-gguf-"), "model.gguf"
    os.symlink(os.path.abspath(src), os.path.join(folder, name))
    try:
        _convert_from(folder, name, src, out, dtype, info)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _convert_from(folder: str, name: str, src: str, out: str, dtype: str, info: dict) -> None:
    """The conversion proper, of folder/name (a link to src, which the messages name)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except NotImplementedError as e:
        raise ValueError(f"{src}: transformers cannot read this GGUF file: {str(e).splitlines()[0]}") from None
    cfg = model.config.to_dict()
    arch = ARCHITECTURES.get(cfg.get("model_type"))
    if arch is None:
        raise ValueError(f"{src}: transformers read it as model_type {cfg.get('model_type')!r}, "
                         f"which is not supported (supported: {', '.join(ARCHITECTURES)})")
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", *_GENERIC_KEYS):
        cfg.pop(k, None)
    cfg.update(architectures=[arch], dtype=dtype)
    tied = bool(cfg.get("tie_word_embeddings"))
    tdtype = getattr(torch, dtype)
    state = {k: v.detach().to(tdtype).contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight") and not k.endswith("rotary_emb.inv_freq")}
    del model
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    del state

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.save_pretrained(out)
    # One copy of the chat template, in tokenizer_config.json (read by transformers and by
    # our Tokenizer); transformers 5 would also write chat_template.jinja.
    tc_path = os.path.join(out, "tokenizer_config.json")
    with open(tc_path, encoding="utf-8") as f:
        tc = json.load(f)
    for k in ("is_local", "local_files_only"):  # how this load was made, not the tokenizer's
        tc.pop(k, None)
    for special in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, special, None)
        if value is not None:
            tc[special] = str(value)
    if tok.chat_template:
        tc["chat_template"] = tok.chat_template
    for extra in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(out, extra)):
            os.remove(os.path.join(out, extra))
    _write_json(tc_path, tc)

    # llama.cpp stops at the EOS and at the end-of-turn / end-of-message ids the file names
    eos = sorted({i for i in (tok.eos_token_id, *info["stop_ids"]) if isinstance(i, int)})
    cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    _write_json(os.path.join(out, "config.json"), cfg)
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": cfg["eos_token_id"], "pad_token_id": tok.pad_token_id}
    _write_json(os.path.join(out, "generation_config.json"), {k: v for k, v in gen.items() if v is not None})
    _write_json(os.path.join(out, MANIFEST), {
        "source": {"path": os.path.abspath(src), "size": os.path.getsize(src), "sha256": sha256_file(src),
                   "architecture": info["architecture"], "name": info["name"], "quant_types": info["quant_types"]},
        "dtype": dtype,
        "files": {f: {"size": os.path.getsize(os.path.join(out, f)), "sha256": sha256_file(os.path.join(out, f))}
                  for f in sorted(os.listdir(out))},
    })


def import_gguf(src: str, out: str, dtype: str = "float32", overwrite: bool = False) -> str:
    """Convert the GGUF file src into the HF directory out (see the module docstring); returns out.
    out must not exist unless overwrite, in which case it is replaced only once the new one is whole."""
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUT_DTYPES}, got {dtype!r}")
    src, out = os.fspath(src), os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} already exists: choose a new directory (or --overwrite)")
    info = inspect_gguf(src)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        _convert(src, tmp, dtype, info)
        # mkdtemp made it 0700: give the directory and its files the modes a plain mkdir / open would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def verify_import(out: str) -> Optional[str]:
    """None when out is a whole import whose files match gguf_source.json (sizes and sha256),
    else the reason it is not."""
    path = os.path.join(out, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable {MANIFEST} ({type(e).__name__})"
    for name, rec in files.items():
        p = os.path.join(out, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        if os.path.getsize(p) != rec.get("size"):
            return f"{name} has {os.path.getsize(p)} bytes, not {rec.get('size')}"
        if sha256_file(p) != rec.get("sha256"):
            return f"{name} does not match its sha256"
    return None


# GGUF tensor types retype_gguf writes (gguf's numpy quantizers); 1-D tensors (norms) stay F32,
# as llama.cpp's converter keeps them
RETYPES = ("F32", "F16", "BF16", "Q8_0")


def retype_gguf(src: str, dst: str, ggml_type: str = "F32") -> str:
    """Rewrite the GGUF file src into dst with every 2-D tensor dequantized and stored as
    ggml_type (metadata copied, general.file_type updated): e.g. an F32 GGUF of the same weights
    that import_gguf reads, so llama.cpp and our fp32 Backbone compute with equal weights.
    dst appears whole or not at all; returns dst."""
    import numpy as np

    gguf = _require_gguf()
    if ggml_type not in RETYPES:
        raise ValueError(f"ggml_type must be one of {RETYPES}, got {ggml_type!r}")
    inspect_gguf(src)  # a one-line error for what we cannot read, before the work
    qtype = gguf.GGMLQuantizationType[ggml_type]
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ggml_type]
    reader = gguf.GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    dst = os.path.abspath(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.partial-", dir=os.path.dirname(dst))
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue  # the writer's own header fields
            sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), f.types[0], sub)
        writer.add_file_type(int(file_type))
        for t in reader.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            if data.ndim > 1 and qtype != gguf.GGMLQuantizationType.F32:
                writer.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(t.name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def add_commands(sub) -> None:
    p = sub.add_parser("import-gguf", help="convert a Llama / Qwen2 GGUF file into a HF model directory")
    p.add_argument("src", help="a .gguf file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ...)")
    p.add_argument("out", help="the HF directory to write (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--dtype", default="float32", choices=OUT_DTYPES, help="dtype of model.safetensors (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace out if it exists (only once the new one is whole)")

    def run(args) -> int:
        out = import_gguf(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
        with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
            info = json.load(f)["source"]
        print(f"wrote {out} ({info['architecture']}, {'/'.join(info['quant_types'])} -> {args.dtype})")
        return 0

    p.set_defaults(func=run)
