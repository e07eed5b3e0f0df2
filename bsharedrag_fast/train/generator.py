"""Generation LoRA: retrieval-augmented instruction tuning, loss on answer tokens only.

Each QA record becomes the prompt RAGPipeline builds at inference (same template, the
top-k `title: text` contexts cut to the same token budget, contexts shrunk so prompt +
answer fit max_length) followed by the answer and EOS; only the answer tokens and EOS
carry loss. General instruction records ({"instruction", "input"?, "output"}) can be
mixed in by ratio to keep the model's general ability.
"""
from __future__ import annotations

from typing import Optional

from ..engine.generation import primary_eos
from ..model.tokenizer import Tokenizer
from ..rag.data import enumerate_jsonl, load_corpus
from ..rag.pipeline import build_prompt, chat_wrap, encode_prompt
from .config import GeneratorConfig, PromptOptions
from .cpt import lm_step
from .loop import TrainResult, build_model, setup_distributed, train_loop
from .sampling import EpochSampler, Rng

GENERAL_PROMPT = "Instruction: {instruction}\n{input}Response:"


def _str_field(rec: dict, name: str, where: str) -> str:
    v = rec.get(name)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f'{where}: "{name}" must be a non-empty string, got {v!r}')
    return v


class AnswerTooLong(ValueError):
    def __init__(self, where: str, tokens: int):
        super().__init__(f"{where}: answer has {tokens} tokens (EOS included)")
        self.where, self.tokens = where, tokens


def too_long_error(path: str, errors: list, limit: int) -> ValueError:
    """One error for every over-long answer of a file: how many, which lines, the limit they need."""
    shown = ", ".join(f"{e.where} ({e.tokens})" for e in errors[:10])
    more = f" and {len(errors) - 10} more" if len(errors) > 10 else ""
    return ValueError(f"{path}: {len(errors)} answers have more than max_answer_tokens={limit} tokens "
                      f"(EOS included): {shown}{more}; the longest needs --max-answer-tokens "
                      f"{max(e.tokens for e in errors)}")


class PromptBuilder:
    """(prompt, answer) -> (token ids, index of the first answer token)."""

    def __init__(self, opts: PromptOptions, tok: Tokenizer, eos: int, model_max_length: int):
        self.opts, self.tok, self.eos = opts, tok, eos
        self.max_length = opts.max_length or model_max_length
        if opts.max_answer_tokens < 1:
            raise ValueError(f"max_answer_tokens must be >= 1, got {opts.max_answer_tokens}")
        self.template = opts.template_text()
        self.chat = opts.chat_for(tok)

    def answer_ids(self, answer: str, where: str) -> list[int]:
        # a chat answer opens the assistant turn; a plain one follows "Answer:" after a space
        text = answer.strip() if self.chat else " " + answer.strip()
        ids = self.tok.encode(text, add_special_tokens=False) + [self.eos]
        if len(ids) > self.opts.max_answer_tokens:
            raise AnswerTooLong(where, len(ids))
        return ids

    def rag(self, question: str, docs: list[dict], answer: str, where: str) -> tuple[list[int], int]:
        ans = self.answer_ids(answer, where)
        try:  # the prompt the RAG pipeline builds at inference
            prompt = build_prompt(self.tok, question, docs[: self.opts.k], self.template, chat=self.chat,
                                  context_tokens=self.opts.context_tokens, max_length=self.max_length,
                                  max_new_tokens=len(ans))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return self._join(encode_prompt(self.tok, prompt, self.chat), ans, where)

    def plain(self, prompt: str, answer: str, where: str) -> tuple[list[int], int]:
        ids = encode_prompt(self.tok, chat_wrap(self.tok, prompt, self.chat), self.chat)
        return self._join(ids, self.answer_ids(answer, where), where)

    def _join(self, prompt: list[int], ans: list[int], where: str) -> tuple[list[int], int]:
        if len(prompt) + len(ans) > self.max_length:
            raise ValueError(f"{where}: prompt ({len(prompt)}) + answer ({len(ans)}) tokens exceed "
                             f"max_length={self.max_length}")
        return prompt + ans, len(prompt)


def _doc(d, where: str) -> dict:
    if isinstance(d, str):
        d = {"text": d}
    if not isinstance(d, dict) or not isinstance(d.get("text"), str):
        raise ValueError(f'{where}: each context must be a string or {{"title", "text"}}, got {d!r}')
    return {"title": d.get("title") or "", "text": d["text"]}


def read_qa(path: str, builder: PromptBuilder, corpus: Optional[dict]) -> list[tuple[list[int], int]]:
    """Tokenized RAG examples of a QA JSONL; bad records are a ValueError naming file:line."""
    from tqdm import tqdm

    out, too_long = [], []
    for n, rec in tqdm(enumerate_jsonl(path, "QA data"), desc=f"reading {path}", unit="ex", leave=False):
        where = f"{path}:{n}"
        q, a = _str_field(rec, "question", where), _str_field(rec, "answer", where)
        if "contexts" in rec:
            if not isinstance(rec["contexts"], list):
                raise ValueError(f'{where}: "contexts" must be a list')
            docs = [_doc(d, where) for d in rec["contexts"]]
        elif "doc_ids" in rec:
            if corpus is None:
                raise ValueError(f'{where}: "doc_ids" needs a corpus (corpus=...)')
            unknown = [d for d in rec["doc_ids"] if str(d) not in corpus]
            if unknown:
                raise ValueError(f"{where}: unknown doc_ids {unknown[:5]}")
            docs = [corpus[str(d)] for d in rec["doc_ids"]]
        else:
            raise ValueError(f'{where}: needs "contexts" or "doc_ids"')
        try:
            out.append(builder.rag(q, docs, a, where))
        except AnswerTooLong as e:  # collected: the error lists every one of them
            too_long.append(e)
    if too_long:
        raise too_long_error(path, too_long, builder.opts.max_answer_tokens)
    if not out:
        raise ValueError(f"{path}: no QA records")
    return out


def read_general(path: str, builder: PromptBuilder) -> list[tuple[list[int], int]]:
    out, too_long = [], []
    for n, rec in enumerate_jsonl(path, "instruction data"):
        where = f"{path}:{n}"
        inst, ans = _str_field(rec, "instruction", where), _str_field(rec, "output", where)
        extra = rec.get("input") or ""
        prompt = GENERAL_PROMPT.format(instruction=inst, input=f"Input: {extra}\n" if extra else "")
        try:
            out.append(builder.plain(prompt, ans, where))
        except AnswerTooLong as e:
            too_long.append(e)
    if too_long:
        raise too_long_error(path, too_long, builder.opts.max_answer_tokens)
    if not out:
        raise ValueError(f"{path}: no instruction records")
    return out


class ExampleSource:
    """Global micro-batches of n (ids, answer start) examples; each slot is drawn from the
    general set with probability ratio."""

    def __init__(self, main: list, general: Optional[list], ratio: float, n: int, seed: int, salt: int = 10):
        self.main, self.general, self.ratio, self.n = main, general, ratio, n
        self.main_order = EpochSampler(len(main), seed, salt)
        self.general_order = EpochSampler(len(general), seed, salt + 1) if general else None
        self.rng = Rng(seed, salt + 2)

    def next_batch(self) -> list:
        batch = []
        for _ in range(self.n):
            if self.general_order is not None and self.rng.gen.random() < self.ratio:
                batch.append(self.general[self.general_order.next()])
            else:
                batch.append(self.main[self.main_order.next()])
        return batch

    def state_dict(self) -> dict:
        st = {"main": self.main_order.state_dict(), "rng": self.rng.state_dict()}
        if self.general_order is not None:
            st["general"] = self.general_order.state_dict()
        return st

    def load_state_dict(self, st: dict) -> None:
        self.main_order.load_state_dict(st["main"])
        self.rng.load_state_dict(st["rng"])
        if self.general_order is not None:
            self.general_order.load_state_dict(st["general"])


def answer_count(batch: list) -> int:
    """Labelled rows of a batch of (ids, answer start): the answer tokens incl. EOS."""
    return sum(len(ids) - start for ids, start in batch)


def _generator_loss(model, batch, dist):
    mine = batch[dist.shard(len(batch), "batch_size")]
    return lm_step(model, [ids for ids, _ in mine], [s for _, s in mine], answer_count(batch))


def load_examples(opts: PromptOptions, model_dir: str, model, data: str, corpus: Optional[str],
                  general: Optional[str] = None):
    """Tokenizer, EOS id and the tokenized (QA, general) examples for a model directory."""
    tok = Tokenizer.from_pretrained(model_dir)
    eos = primary_eos(model, tok)
    if eos is None:
        raise ValueError(f"{model_dir}: no EOS token (tokenizer_config.json or config.json eos_token_id)")
    builder = PromptBuilder(opts, tok, eos, model.config.max_position_embeddings)
    qa = read_qa(data, builder, load_corpus(corpus) if corpus else None)
    return tok, eos, qa, read_general(general, builder) if general else None


def train_generator(cfg: GeneratorConfig) -> TrainResult:
    """Train the generation LoRA; writes a PEFT adapter to cfg.out."""
    cfg.check()
    dist, dev = setup_distributed(cfg.device)
    model = build_model(cfg, cfg.model, dist, dev, cfg.lora_spec(), cfg.init_adapter)
    tok, _, qa, general = load_examples(cfg, cfg.model, model, cfg.data, cfg.corpus,
                                        cfg.general if cfg.general_ratio > 0 else None)
    cfg.resolve_steps(len(qa), cfg.batch_size * cfg.grad_accum)
    source = ExampleSource(qa, general, cfg.general_ratio, cfg.batch_size, cfg.seed)
    return train_loop(cfg, model, source, _generator_loss, cfg.saver(model, cfg.model, tok), dist, "generator")
