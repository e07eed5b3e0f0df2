"""Retrieval LoRA (RepLLaMA-style) and the Fully-shared baseline.

Inputs are tokenized as SharedRuntime.embed does at inference: `query: {q}` /
`passage: {title} {text}`, BOS as the tokenizer adds it, EOS appended; the embedding is
the mean (or, --pooling last, the last token's) hidden state after the final norm,
L2-normalised (ops.pool with the norm fused). The pooling and prefixes are saved beside
the adapter (rag.EMBEDDING_FILE) so that index, ask, eval and serve embed the same way.
Loss: InfoNCE at temperature 0.01, each query against its positive, its n hard negatives
and every other passage of the global batch (under torchrun the
passages and queries of all ranks are gathered; each rank differentiates its own, so
the summed gradient is exactly that of one process on the whole batch).

Queries and passages (and, with fully_shared, the generation examples) go through ONE
packed forward.

Data: a BEIR directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; relevance > 0
is positive) with optional mined negatives ({"qid", "negatives": [doc ids]} per line,
see mine.py; without them negatives are drawn from the corpus at random), or a JSONL of
triples {"query", "positive" or "positives", "negatives"?} whose passages are strings or
{"title", "text"}.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..engine.generation import primary_eos
from ..model.backbone import pack
from ..model.tokenizer import Tokenizer
from ..rag.data import enumerate_jsonl, load_beir, passage_text
from ..rag.pipeline import save_embedding_format
from .config import RetrieverConfig
from .cpt import causal_labels
from .generator import ExampleSource, answer_count, load_examples
from .loop import TrainResult, build_model, setup_distributed, train_loop
from .sampling import EpochSampler, Rng


@dataclass
class RetrievalData:
    queries: list  # query texts
    passages: list  # {"title", "text"}
    positives: list  # per query: passage indices
    negatives: list  # per query: passage indices (may be empty: random ones are drawn)


def _passage(p, where: str) -> dict:
    if isinstance(p, str) and p.strip():
        return {"title": "", "text": p}
    if isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"].strip():
        return {"title": p.get("title") or "", "text": p["text"]}
    raise ValueError(f'{where}: a passage must be a non-empty string or {{"title", "text"}}, got {p!r}')


def read_triples(path: str) -> RetrievalData:
    data = RetrievalData([], [], [], [])
    index: dict = {}

    def idx(p) -> int:
        key = (p["title"], p["text"])
        if key not in index:
            index[key] = len(data.passages)
            data.passages.append(p)
        return index[key]

    for n, rec in enumerate_jsonl(path, "triples"):
        where = f"{path}:{n}"
        q = rec.get("query")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f'{where}: "query" must be a non-empty string, got {q!r}')
        if "positives" in rec:
            pos = rec["positives"]
        elif "positive" in rec:
            pos = [rec["positive"]]
        else:
            raise ValueError(f'{where}: missing "positive" / "positives"')
        if not isinstance(pos, list) or not pos:
            raise ValueError(f'{where}: "positives" is empty')
        negs = rec.get("negatives") or []
        if not isinstance(negs, list):
            raise ValueError(f'{where}: "negatives" must be a list')
        data.queries.append(q)
        data.positives.append([idx(_passage(p, where)) for p in pos])
        data.negatives.append([idx(_passage(p, where)) for p in negs])
    if not data.queries:
        raise ValueError(f"{path}: no training triples")
    return data


def read_beir(path: str, split: str, negatives: Optional[str]) -> RetrievalData:
    beir = load_beir(path, split)
    ids = list(beir.corpus)
    pos_of = {d: i for i, d in enumerate(ids)}
    mined: dict = {}
    if negatives:
        for n, rec in enumerate_jsonl(negatives, "negatives"):
            where = f"{negatives}:{n}"
            qid, negs = rec.get("qid"), rec.get("negatives")
            if qid is None or not isinstance(negs, list):
                raise ValueError(f'{where}: needs "qid" and a "negatives" list')
            unknown = [d for d in negs if str(d) not in pos_of]
            if unknown:
                raise ValueError(f"{where}: unknown document ids {unknown[:5]}")
            mined[str(qid)] = [pos_of[str(d)] for d in negs]
    data = RetrievalData([], [beir.corpus[d] for d in ids], [], [])
    for qid, judged in beir.qrels.items():
        pos = [pos_of[d] for d, rel in judged.items() if rel > 0]
        if not pos:
            raise ValueError(f"{path}: query {qid!r} has no positive (relevance > 0) document in qrels/{split}.tsv")
        data.queries.append(beir.queries[qid])
        data.positives.append(pos)
        pos_set = set(pos)
        data.negatives.append([i for i in mined.get(qid, []) if i not in pos_set])
    return data


class RetrievalSource:
    """Global micro-batches: per query its token ids, then [positive, n negatives] ids."""

    def __init__(self, cfg: RetrieverConfig, data: RetrievalData, tok: Tokenizer, eos: int):
        self.cfg, self.data, self.tok, self.eos = cfg, data, tok, eos
        self.order = EpochSampler(len(data.queries), cfg.seed, 20)
        self.rng = Rng(cfg.seed, 21)
        self._cache: dict = {}
        if len(data.passages) <= 1 and cfg.num_negatives:
            raise ValueError("num_negatives > 0 needs more than one passage to draw negatives from")

    def _ids(self, text: str, prefix: str, max_len: int) -> list[int]:
        return self.tok.encode(prefix + text, add_special_tokens=True)[: max_len - 1] + [self.eos]

    def passage_ids(self, i: int) -> list[int]:
        if i not in self._cache:
            p = self.data.passages[i]
            self._cache[i] = self._ids(passage_text(p), self.cfg.passage_prefix,
                                       self.cfg.passage_max_len)
        return self._cache[i]

    def _negatives(self, q: int) -> list[int]:
        n, g = self.cfg.num_negatives, self.rng.gen
        mined = self.data.negatives[q]
        if len(mined) >= n:
            return [mined[j] for j in g.choice(len(mined), n, replace=False)] if n else []
        if mined:  # too few mined: repeat some
            return [mined[j] for j in g.choice(len(mined), n, replace=True)]
        pos, out = set(self.data.positives[q]), []
        while len(out) < n:
            j = int(g.integers(len(self.data.passages)))
            if j not in pos:
                out.append(j)
        return out

    def next_batch(self) -> list:
        batch = []
        for _ in range(self.cfg.batch_size):
            q = self.order.next()
            pos = self.data.positives[q]
            p = pos[int(self.rng.gen.integers(len(pos)))]
            passages = [self.passage_ids(i) for i in [p] + self._negatives(q)]
            batch.append((self._ids(self.data.queries[q], self.cfg.query_prefix, self.cfg.query_max_len), passages))
        return batch

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "rng": self.rng.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.order.load_state_dict(st["order"])
        self.rng.load_state_dict(st["rng"])


def info_nce(q: torch.Tensor, p: torch.Tensor, group: int, temperature: float) -> torch.Tensor:
    """Mean InfoNCE of queries q [B, d] over all passages p [B * group, d]; query i's
    positive is passage i * group."""
    scores = (q.float() @ p.float().t()) / temperature
    target = torch.arange(q.shape[0], device=q.device) * group
    return F.cross_entropy(scores, target)


class _FullySharedSource:
    """A retrieval batch and a generation batch per micro-batch."""

    def __init__(self, ret: RetrievalSource, gen: ExampleSource):
        self.ret, self.gen = ret, gen

    def next_batch(self):
        return self.ret.next_batch(), self.gen.next_batch()

    def state_dict(self) -> dict:
        return {"ret": self.ret.state_dict(), "gen": self.gen.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.ret.load_state_dict(st["ret"])
        self.gen.load_state_dict(st["gen"])


def _make_loss(cfg: RetrieverConfig):
    group = 1 + cfg.num_negatives

    def loss_fn(model, batch, dist):
        ret, gen = batch if cfg.fully_shared else (batch, None)
        mine = ret[dist.shard(len(ret), "batch_size")]
        seqs = [q for q, _ in mine] + [p for _, ps in mine for p in ps]
        gen_mine = gen[dist.shard(len(gen), "gen_batch_size")] if gen else []
        ids, cu = pack(seqs + [g for g, _ in gen_mine])
        h = model.hidden(ids, cu)
        n_ret = int(cu[len(seqs)])
        emb = model.embed_sequences(h[:n_ret], cu[: len(seqs) + 1], cfg.pooling)
        b = len(mine)
        loss = info_nce(dist.all_gather(emb[:b]), dist.all_gather(emb[b:]), group, cfg.temperature)
        value = loss.detach() / dist.world  # every rank holds the global loss
        if not gen:
            return loss, value, int(ids.numel())
        labels = causal_labels([g for g, _ in gen_mine], [s for _, s in gen_mine]).to(h.device)
        g_loss, _ = model.lm_loss(h[n_ret:], labels)
        g_loss = g_loss * (cfg.gen_weight / answer_count(gen))  # this rank's share of the global mean
        # each task's term, logged beside the total (metrics.jsonl: retrieval_loss, generation_loss)
        parts = {"retrieval": value, "generation": g_loss.detach()}
        return loss + g_loss, value + g_loss.detach(), int(ids.numel()), parts

    return loss_fn


def train_retriever(cfg: RetrieverConfig) -> TrainResult:
    """Train the retrieval LoRA (or, fully_shared, one LoRA on both losses) and write a PEFT
    adapter; with full_finetune, train every weight and write a whole HF model."""
    cfg.check()
    dist, dev = setup_distributed(cfg.device)
    model = build_model(cfg, cfg.model, dist, dev, None if cfg.full_finetune else cfg.lora_spec(), cfg.init_adapter)
    data = read_beir(cfg.data, cfg.split, cfg.negatives) if os.path.isdir(cfg.data) else read_triples(cfg.data)
    tok = Tokenizer.from_pretrained(cfg.model)
    eos = primary_eos(model, tok)
    if eos is None:
        raise ValueError(f"{cfg.model}: no EOS token (tokenizer_config.json or config.json eos_token_id)")
    source = RetrievalSource(cfg, data, tok, eos)
    if cfg.fully_shared:
        _, _, qa, _ = load_examples(cfg, cfg.model, model, cfg.gen_data, cfg.gen_corpus)
        source = _FullySharedSource(source, ExampleSource(qa, None, 0.0, cfg.gen_batch_size, cfg.seed))
    cfg.resolve_steps(len(data.queries), cfg.batch_size * cfg.grad_accum)
    name = "fully-shared" if cfg.fully_shared else "retriever"
    if cfg.full_finetune:
        save_weights = lambda out: model.save_pretrained(out, cfg.model)  # noqa: E731
    elif cfg.fully_shared:  # a Fully-shared adapter also answers: it keeps the prompt format it was trained with
        save_weights = cfg.saver(model, cfg.model, tok)
    else:
        save_weights = lambda out: model.save_lora(out, cfg.model)  # noqa: E731

    def save(out: str) -> None:  # index, ask, eval and the server then embed as trained (rag.EMBEDDING_FILE)
        save_weights(out)
        save_embedding_format(out, cfg.pooling, cfg.query_prefix, cfg.passage_prefix)

    return train_loop(cfg, model, source, _make_loss(cfg), save, dist,
                      "retriever (full)" if cfg.full_finetune else name)
