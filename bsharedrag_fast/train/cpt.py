"""Continual pre-training: full-parameter causal LM on a mix of domain and general text.

Each corpus is a stream of documents (BOS + text + EOS, in a fresh shuffled order every
epoch). A training row holds seq_len tokens cut from one stream, chosen per row with
probability domain_ratio for the domain corpora; the documents inside a row stay
separate packed sequences (their own cu_seqlens, positions from 0, no attention across
documents), and a document that does not fit continues in the stream's next row.
"""
from __future__ import annotations

import torch

from ..engine.generation import primary_eos
from ..model.backbone import IGNORE, pack
from ..model.tokenizer import Tokenizer
from ..rag.data import enumerate_jsonl
from .config import PretrainConfig
from .loop import TrainResult, build_model, setup_distributed, train_loop
from .sampling import EpochSampler, Rng


def read_texts(paths: list, tok: Tokenizer, eos: int) -> list[list[int]]:
    """Token ids (BOS as the tokenizer adds it, EOS appended) of every {"text"} record."""
    from tqdm import tqdm

    docs = []
    for path in paths:
        for n, rec in tqdm(enumerate_jsonl(path, "text corpus"), desc=f"tokenizing {path}", unit="doc",
                           leave=False):
            text = rec.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f'{path}:{n}: "text" must be a non-empty string, got {text!r}')
            docs.append(tok.encode(text, add_special_tokens=True) + [eos])
    if not docs:
        raise ValueError(f"no documents in {paths}")
    return docs


class DocStream:
    """Rows of exactly `length` tokens cut from shuffled documents; a row is a list of
    document pieces (each becomes its own packed sequence)."""

    def __init__(self, docs: list, seed: int, salt: int):
        self.docs, self.order, self.offset = docs, EpochSampler(len(docs), seed, salt), 0
        self.doc = self.order.next()

    def row(self, length: int) -> list[list[int]]:
        pieces, left = [], length
        while left:
            d = self.docs[self.doc]
            piece = d[self.offset : self.offset + left]
            pieces.append(piece)
            left -= len(piece)
            self.offset += len(piece)
            if self.offset == len(d):
                self.doc, self.offset = self.order.next(), 0
        return pieces

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "doc": self.doc, "offset": self.offset}

    def load_state_dict(self, st: dict) -> None:
        self.order.load_state_dict(st["order"])
        self.doc, self.offset = st["doc"], st["offset"]


class PretrainSource:
    """Global micro-batches: batch_size rows, each from the domain stream w.p. domain_ratio."""

    def __init__(self, cfg: PretrainConfig, tok: Tokenizer, eos: int):
        self.cfg = cfg
        self.streams = {}
        if cfg.domain and cfg.domain_ratio > 0:
            self.streams["domain"] = DocStream(read_texts(cfg.domain, tok, eos), cfg.seed, 1)
        if cfg.general and cfg.domain_ratio < 1:
            self.streams["general"] = DocStream(read_texts(cfg.general, tok, eos), cfg.seed, 2)
        self.rng = Rng(cfg.seed, 3)

    def next_batch(self) -> list[list[list[int]]]:
        rows = []
        for _ in range(self.cfg.batch_size):
            if len(self.streams) == 2:
                name = "domain" if self.rng.gen.random() < self.cfg.domain_ratio else "general"
            else:
                name = next(iter(self.streams))
            rows.append(self.streams[name].row(self.cfg.seq_len))
        return rows

    def state_dict(self) -> dict:
        return {"rng": self.rng.state_dict(), **{k: s.state_dict() for k, s in self.streams.items()}}

    def load_state_dict(self, st: dict) -> None:
        self.rng.load_state_dict(st["rng"])
        for k, s in self.streams.items():
            s.load_state_dict(st[k])


def causal_labels(seqs: list, loss_from: list | None = None) -> torch.Tensor:
    """Labels [T] of packed sequences: each row's next token within its sequence; the last
    row of a sequence, and rows before loss_from[b] (its first labelled target), get IGNORE."""
    labels = []
    for b, s in enumerate(seqs):
        lab = list(s[1:]) + [IGNORE]
        if loss_from is not None:
            lab[: loss_from[b] - 1] = [IGNORE] * (loss_from[b] - 1)
        labels += lab
    return torch.tensor(labels, dtype=torch.long)


def lm_step(model, seqs: list, loss_from: list | None, global_count: int):
    """Summed next-token loss of these packed sequences / the global label count (a StepLoss)."""
    ids, cu = pack(seqs)
    labels = causal_labels(seqs, loss_from).to(model.device)
    loss, _ = model.lm_loss(model.hidden(ids, cu), labels)
    loss = loss / global_count
    return loss, loss.detach(), int(ids.numel())


def _pretrain_loss(model, batch, dist):
    mine = batch[dist.shard(len(batch), "batch_size")]
    total = sum(len(p) - 1 for row in batch for p in row)
    return lm_step(model, [p for row in mine for p in row], None, max(1, total))


def pretrain(cfg: PretrainConfig) -> TrainResult:
    """Full-parameter continual pre-training; writes an HF checkpoint (+ tokenizer) to cfg.out."""
    cfg.check()
    dist, dev = setup_distributed(cfg.device)
    tok = Tokenizer.from_pretrained(cfg.model)
    model = build_model(cfg, cfg.model, dist, dev)
    eos = primary_eos(model, tok)
    if eos is None:
        raise ValueError(f"{cfg.model}: no EOS token (tokenizer_config.json or config.json eos_token_id)")
    source = PretrainSource(cfg, tok, eos)
    return train_loop(cfg, model, source, _pretrain_loss, lambda out: model.save_pretrained(out, cfg.model),
                      dist, "pretrain")
