"""`bsharedrag train {pretrain,retriever,generator}` and `bsharedrag mine-negatives`.

The train options are generated from the *Config dataclasses (one --option per field,
its help text from the field), so the command line and the Python API cannot drift apart.
Under torchrun every rank runs the same command:
    torchrun --nproc_per_node 2 -m bsharedrag_fast.cli train retriever --model M --data D --out O
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _bool(s: str) -> bool:
    if s.lower() not in _BOOL:
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return _BOOL[s.lower()]


def _add_config_args(p: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        opt = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        text = f.metadata.get("help", "")
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
        if base is bool:
            p.add_argument(opt, type=_bool, nargs="?", const=True, default=default,
                           help=f"{text} (true/false; default {default})")
        elif kind is list:
            p.add_argument(opt, nargs="+", default=default, required=required,
                           help=f"{text} (one or more; default {' '.join(map(str, default or [])) or 'none'})")
        else:
            p.add_argument(opt, type=base, default=default, required=required,
                           help=text + ("" if required else f" (default {default})"))


def _config(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _report(result) -> int:
    print(f"{result.steps} steps, final loss {result.final_loss:.4f}, {result.tokens_per_s:.0f} tokens/s; "
          f"wrote {result.out_dir} (metrics {result.metrics_path}, plot {result.plot_path})")
    return 0


def cmd_pretrain(args) -> int:
    from ..train import PretrainConfig, pretrain

    return _report(pretrain(_config(PretrainConfig, args)))


def cmd_retriever(args) -> int:
    from ..train import RetrieverConfig, train_retriever

    return _report(train_retriever(_config(RetrieverConfig, args)))


def cmd_generator(args) -> int:
    from ..train import GeneratorConfig, train_generator

    return _report(train_generator(_config(GeneratorConfig, args)))


def cmd_mine(args) -> int:
    import torch

    from ..train import mine_negatives

    path = mine_negatives(args.model, args.adapter, args.data, args.out, k=args.k, split=args.split, skip=args.skip,
                          query_prefix=args.query_prefix, passage_prefix=args.passage_prefix, pooling=args.pooling,
                          batch_size=args.batch_size, dtype=getattr(torch, args.dtype), device=args.device,
                          max_batch_tokens=args.max_batch_tokens, max_length=args.max_length)
    print(f"wrote hard negatives to {path}")
    return 0


def add_commands(sub) -> None:
    """Register `train {pretrain,retriever,generator}` and `mine-negatives` on a subparsers object."""
    from ..train.config import GeneratorConfig, PretrainConfig, RetrieverConfig
    from .args import add_embedding_format, add_max_length

    fmt = argparse.ArgumentDefaultsHelpFormatter
    train = sub.add_parser("train", help="train: continual pre-training, the retrieval or the generation LoRA")
    stages = train.add_subparsers(dest="stage", required=True)
    for name, cls, func, text in (
        ("pretrain", PretrainConfig, cmd_pretrain, "full-parameter continual pre-training on domain + general text"),
        ("retriever", RetrieverConfig, cmd_retriever,
         "retrieval LoRA: InfoNCE over hard negatives + in-batch passages (--fully-shared: the baseline)"),
        ("generator", GeneratorConfig, cmd_generator, "generation LoRA: RAG prompts, loss on answer tokens"),
    ):
        p = stages.add_parser(name, help=text, description=text)
        _add_config_args(p, cls)
        p.set_defaults(func=func)

    p = sub.add_parser("mine-negatives", formatter_class=fmt,
                       help="hard negatives for the retriever: its top-k per training query minus positives")
    p.add_argument("--model", required=True, help="HF model directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--adapter", default=None, help="PEFT retrieval LoRA directory (default: the base model)")
    p.add_argument("--data", required=True, help="BEIR directory (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)")
    p.add_argument("--out", required=True, help="output JSONL: {qid, negatives} per query")
    p.add_argument("--k", type=int, default=30, help="negatives per query")
    p.add_argument("--skip", type=int, default=0, help="top ranks left out (often unjudged positives)")
    p.add_argument("--split", default="train", help="qrels split")
    add_embedding_format(p)
    p.add_argument("--batch-size", type=int, default=64, help="texts embedded per call")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="tokens packed into one engine step")
    add_max_length(p)
    p.set_defaults(func=cmd_mine)
