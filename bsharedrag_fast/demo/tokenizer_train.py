"""Train a byte-level BPE tokenizer (the `tokenizers` library) for a model trained from scratch.

    out = train_bpe_tokenizer([paths.domain, paths.general], "tok", vocab_size=2048)
    tok = bsharedrag_fast.Tokenizer.from_pretrained(out)     # or transformers.AutoTokenizer
    cfg = Qwen2Config(vocab_size=tok.vocab_size, **SPECIAL_TOKEN_IDS, ...)

Special tokens come first, so their ids are fixed: <s> = 0 (bos), </s> = 1 (eos), <pad> = 2,
<unk> = 3. encode(add_special_tokens=True) prepends <s> (as Llama tokenizers do); the chat
template wraps each turn as ``<s>{role}\\n{content}</s>\\n``, so a generated turn ends at eos.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Union

from ..rag.data import read_jsonl

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>"]
# ids of the special tokens, named as model configs name them
SPECIAL_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
UNK_TOKEN_ID = 3
CHAT_TEMPLATE = ("{% for m in messages %}{{ bos_token + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}")


def _file_texts(path: str) -> Iterator[str]:
    """A .jsonl file gives each record's "title" and "text"; any other file each non-blank line."""
    if path.endswith(".jsonl"):
        for rec in read_jsonl(path):
            text = rec.get("text")
            if not isinstance(text, str):
                raise ValueError(f'{path}: every record needs a string "text", got {text!r}')
            title = rec.get("title")
            yield f"{title}. {text}" if isinstance(title, str) and title else text
    else:
        with open(path, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())


def _texts(texts_or_files: Iterable[Union[str, os.PathLike]]) -> Iterator[str]:
    for item in texts_or_files:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and os.path.isfile(item)):
            path = os.fspath(item)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer training file not found: {path}")
            yield from _file_texts(path)
        elif isinstance(item, str):
            yield item
        else:
            raise ValueError(f"texts_or_files items must be texts or file paths, got {type(item).__name__}")


def train_bpe_tokenizer(texts_or_files: Iterable[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike],
                        vocab_size: int = 2048, min_frequency: int = 2, model_max_length: int = 2048) -> str:
    """Train a byte-level BPE tokenizer and save tokenizer.json + tokenizer_config.json in out_dir;
    returns out_dir. texts_or_files: texts, and paths of files (a pathlib.Path, or a str naming an
    existing file) read as described in _file_texts. The vocabulary (special tokens and the 256 byte
    tokens included) is at most vocab_size: a small corpus stops the merges earlier."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if isinstance(texts_or_files, (str, bytes, os.PathLike)):
        raise ValueError("texts_or_files must be a list of texts or file paths, not a single "
                         f"{type(texts_or_files).__name__}")
    min_vocab = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if not isinstance(vocab_size, int) or vocab_size <= min_vocab:
        raise ValueError(f"vocab_size must be an int > {min_vocab} (special tokens + 256 bytes), got {vocab_size!r}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    seen = 0

    def counted():
        nonlocal seen
        for text in _texts(texts_or_files):
            seen += 1
            yield text

    tok.train_from_iterator(counted(), trainer)
    if seen == 0:
        raise ValueError("texts_or_files gave no text to train on")
    bos = SPECIAL_TOKENS[SPECIAL_TOKEN_IDS["bos_token_id"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, SPECIAL_TOKEN_IDS["bos_token_id"])])

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": model_max_length,
              "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    return out_dir
