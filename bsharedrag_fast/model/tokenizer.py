"""A small tokenizer over the `tokenizers` library (a HF tokenizer.json), no transformers.

`Tokenizer.from_pretrained(dir)` reads tokenizer.json, and tokenizer_config.json when
present for the bos / eos / pad / unk tokens and the chat template (also read from
chat_template.jinja or chat_template.json, where newer transformers save it). Special
tokens added by `encode(add_special_tokens=True)` are whatever tokenizer.json's
post-processor adds (as transformers' PreTrainedTokenizerFast does).
Chat templates render in a jinja2 sandbox with the same options and helpers
transformers uses (trim_blocks, lstrip_blocks, raise_exception, strftime_now, tojson).
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Optional

from ..util.jsonfile import read_json

SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_str(value) -> Optional[str]:
    """tokenizer_config.json stores a special token as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _valid_text(text: str) -> str:
    """text, or a ValueError when it cannot be UTF-8 (a lone surrogate such as JSON's "\\ud800"),
    which the tokenizer library would fail on with an unclear error."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}") \
            from None
    return text

class Tokenizer:
    def __init__(self, tokenizer, special_tokens: Optional[dict] = None, chat_template: Optional[str] = None):
        self._tok = tokenizer
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self._compiled = None

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        from .store import resolve_model

        path = resolve_model(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise ValueError(f"no tokenizer.json in {path!r} (only fast tokenizers are supported)")
        cfg = {}
        cp = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cp):
            cfg = read_json(cp, "tokenizer config")
            if not isinstance(cfg, dict):
                raise ValueError(f"{cp}: expected a JSON object")
        special = {name: _token_str(cfg.get(name)) for name in SPECIAL_NAMES}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_path = os.path.join(path, "chat_template.jinja")
        json_path = os.path.join(path, "chat_template.json")
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path) as f:
                template = f.read()
        elif template is None and os.path.isfile(json_path):
            rec = read_json(json_path, "chat template")
            template = rec.get("chat_template") if isinstance(rec, dict) else None
        try:
            hf = HFTokenizer.from_file(tj)
        except Exception as e:  # the tokenizers library raises a bare Exception on a broken file
            raise ValueError(f"{tj}: not a readable tokenizer.json ({' '.join(str(e).split())})") from None
        return cls(hf, special, template)

    # -- ids ---------------------------------------------------------------------------

    def _id(self, name: str) -> Optional[int]:
        tok = self.special_tokens.get(name)
        return None if tok is None else self._tok.token_to_id(tok)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._id("pad_token")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    # -- encode / decode ---------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(_valid_text(text), add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        texts = [_valid_text(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_cut(self, ids) -> str:
        """decode() of ids cut at some token (a context budget, max_new_tokens): a byte-level
        BPE splits characters such as CJK or emoji across tokens, and the cut-off bytes would
        show as U+FFFD at the end; they are dropped."""
        return self.decode(ids).rstrip("\ufffd")

    # -- chat --------------------------------------------------------------------------

    def _template(self):
        if self._compiled is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(self.chat_template)
        return self._compiled

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs):
        """Render messages ([{"role", "content"}]) with the chat template; the string, or
        its ids (without adding special tokens again) when tokenize=True."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja)")
        text = self._template().render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text
