"""What every command line shares: argument types, the option groups (model, embedder,
index, prompt), and the glue from parsed arguments to the library's factories
(SharedRuntime.from_pretrained, rag.load_rag, HNSWIndex.load).

Imported by cli.py and by the modules that register their own command groups (train,
eval, serve, demo, bench), so none of them imports cli.py; the library itself never
imports this module. Heavy imports stay inside the functions, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import math
from typing import Optional

# --dtype choices (torch dtype names); int8: weight-only int8 (per-row scales, float32 activations; CPU inference)
DTYPES = ("float32", "bfloat16", "float16", "int8")


# ----------------------------------------------------------------------------- argument types


def _int_at_least(value: str, low: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value!r}")
    return n


def positive_int(value: str) -> int:
    return _int_at_least(value, 1)


def nonnegative_int(value: str) -> int:
    return _int_at_least(value, 0)


def finite_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return x


def device_arg(value: str) -> str:
    """A torch device this machine has: cpu, cuda or cuda:N."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {value!r} (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: only cpu and cuda devices are supported")
    return value


def torch_dtype(name: str):
    """--dtype's name -> the torch dtype."""
    import torch

    return getattr(torch, name)


# ----------------------------------------------------------------------------- option groups


def add_model_args(p) -> None:
    from ..model.store import DEFAULT_MODEL, NAMED_MODELS

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF model directory (config.json, *.safetensors, tokenizer.json), a .gguf file, or a "
                        f"model name: {', '.join(NAMED_MODELS)} (default {DEFAULT_MODEL}, converted once and cached)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weight dtype (default float32); int8: weight-only int8 with a scale per output row, "
                        "float32 activations (CPU inference)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--max-batch-tokens", type=positive_int, default=2048, help="tokens packed into one engine step")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="run decode steps as CUDA graphs, one captured per batch size bucket (--device cuda)")
    p.add_argument("--speculate", type=nonnegative_int, default=None,
                   help="draft tokens a greedy decode step may check, found by prompt lookup: the same output in "
                        "fewer steps (default 4 with float32 weights, else 0; 0: off)")


def add_index_load_args(p) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the index files on load (for huge indexes)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use an index built by another embedder (model, adapter, pooling, prefixes or max length "
                        "differ): logged, not refused; its results are then likely wrong")


def add_max_length(p) -> None:
    from ..rag.pipeline import DEFAULT_MAX_LENGTH

    p.add_argument("--max-length", type=positive_int, default=DEFAULT_MAX_LENGTH,
                   help="longest embedded input in tokens, prefix and EOS included; longer ones are cut and "
                        f"counted, never refused (as `train retriever --passage-max-len`; default {DEFAULT_MAX_LENGTH})")


_AS_TRAINED = "default: as the retrieval adapter was trained (its embedding.json), else"


def add_pooling(p) -> None:
    from ..util.pool_modes import MODES

    p.add_argument("--pooling", default=None, choices=MODES, help=f"{_AS_TRAINED} last")


def add_embedding_format(p) -> None:
    add_pooling(p)
    p.add_argument("--query-prefix", default=None, help=f'text put before each query ({_AS_TRAINED} "query: ")')
    p.add_argument("--passage-prefix", default=None,
                   help=f'text put before each document ({_AS_TRAINED} "passage: ")')


def add_embedder_args(p: argparse.ArgumentParser) -> None:
    add_max_length(p)
    add_embedding_format(p)


def add_prompt_args(p) -> None:
    p.add_argument("--template", default=None,
                   help="en, zh, or a file with {context} and {question} (default: the one the generation "
                        "adapter was trained with, else en)")
    p.add_argument("--raw", action="store_true",
                   help="do not put the prompt in the model's chat template (default: as the generation adapter "
                        "was trained, else whenever the tokenizer has a chat template)")


def add_rag_args(p, index_required: bool, k_flag: str = "--k") -> None:
    """What a RAG pipeline needs (rag_from_args): the model and both adapters, the index, how
    many documents, the prompt, the context budget, the embedder, the answer length."""
    add_model_args(p)
    p.add_argument("--retrieval-adapter", default=None, help="PEFT retrieval LoRA directory")
    p.add_argument("--generation-adapter", default=None, help="PEFT generation LoRA directory")
    p.add_argument("--index", required=index_required, default=None, help="index directory built by `bsharedrag index`")
    add_index_load_args(p)
    p.add_argument(k_flag, type=positive_int, default=3, help="documents retrieved per question (default 3)")
    add_prompt_args(p)
    p.add_argument("--context-tokens", type=positive_int, default=768, help="token budget of the retrieved contexts")
    add_embedder_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="longest answer (default 128)")


# ----------------------------------------------------------------------------- arguments -> library


def runtime_from_args(args, adapters: dict, **runtime_kw):
    """The shared engine a command's --model / --dtype / --device / --max-batch-tokens
    describe, with the named PEFT adapters (name -> directory or None) loaded."""
    from ..engine.runtime import SharedRuntime

    if args.cuda_graphs and not str(args.device).startswith("cuda"):
        raise ValueError(f"--cuda-graphs needs --device cuda, got --device {args.device}")
    return SharedRuntime.from_pretrained(args.model, adapters, dtype=torch_dtype(args.dtype), device=args.device,
                                         max_batch_tokens=args.max_batch_tokens,
                                         decode_graphs="cuda" if args.cuda_graphs else "off",
                                         speculate=args.speculate, **runtime_kw)


def resolve_embedding_args(args, adapter_dir: Optional[str]) -> None:
    """Fill the embedding options left unset (None) as the retrieval adapter was trained, or,
    without one, as the model (a fully fine-tuned embedder) was; else the defaults."""
    from ..rag.pipeline import embedding_settings

    given = {k: getattr(args, k) for k in ("pooling", "query_prefix", "passage_prefix") if hasattr(args, k)}
    settings = embedding_settings(adapter_dir or args.model, **given)
    for k in given:
        setattr(args, k, settings[k])


def embedder_fingerprint(args, adapter_path: Optional[str]) -> dict:
    """What the index manifest records about the vectors' embedder (fingerprint.py): the
    content of the model and adapter, pooling, prefixes and length limit."""
    from ..model.fingerprint import embedder_fingerprint as fingerprint
    from ..model.store import resolve_model

    return fingerprint(resolve_model(args.model), adapter_path, args.pooling, args.query_prefix, args.passage_prefix,
                       args.max_length)


def index_from_args(args, path: str, adapter_path: Optional[str]):
    """The saved index at path, checked (sha256 unless --no-verify) and matched against this
    command's embedder (a mismatch is an error unless --allow-mismatch)."""
    from ..index.hnsw import HNSWIndex

    return HNSWIndex.load(path, embedder=embedder_fingerprint(args, adapter_path), verify=not args.no_verify,
                          allow_mismatch=args.allow_mismatch)


def rag_from_args(args, k: int):
    """The RAG pipeline a command's arguments describe (see rag.load_rag)."""
    from ..rag.pipeline import load_rag

    return load_rag(args.model, args.index, args.retrieval_adapter, args.generation_adapter, k=k,
                    template=args.template, raw=args.raw, context_tokens=args.context_tokens,
                    max_new_tokens=args.max_new_tokens, pooling=args.pooling, query_prefix=args.query_prefix,
                    passage_prefix=args.passage_prefix, max_length=args.max_length, dtype=torch_dtype(args.dtype),
                    device=args.device, max_batch_tokens=args.max_batch_tokens, speculate=args.speculate,
                    verify=not args.no_verify,
                    allow_mismatch=args.allow_mismatch)
