"""The options of the three training stages, as dataclasses whose fields carry their help
text (the command line builds its flags from them: cli/train.py). Torch-free, so that
`bsharedrag --help` does not load torch; what needs it is imported inside the methods."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..model.targets import TARGET_MODULES
from ..util.pool_modes import MODES

if TYPE_CHECKING:
    from ..model.backbone import LoRASpec
    from ..model.tokenizer import Tokenizer


def option(text: str, **kw):
    """A dataclass field whose help text the command line shows (see cli/train.py)."""
    return field(metadata={"help": text}, **kw)


@dataclass(kw_only=True)
class LoopConfig:
    """Options every stage shares."""

    out: str = option("output directory (final model or adapter, checkpoints, metrics.jsonl, loss.png)")
    steps: int = option("optimizer steps", default=1000)
    lr: float = option("peak learning rate of AdamW", default=1e-4)
    warmup_steps: int = option("linear warmup steps before the cosine decay", default=100)
    min_lr_ratio: float = option("final learning rate as a fraction of lr (cosine floor)", default=0.0)
    weight_decay: float = option("AdamW weight decay", default=0.0)
    grad_accum: int = option("micro-batches accumulated per optimizer step", default=1)
    max_grad_norm: float = option("clip the global gradient norm to this (0 = no clipping)", default=1.0)
    activation_checkpointing: bool = option("recompute each layer in backward to save memory", default=False)
    seed: int = option("seed of the data order, sampling, init and dropout", default=0)
    save_every: int = option("steps between resumable checkpoints (0 = none)", default=500)
    keep_checkpoints: int = option("newest checkpoints kept on disk", default=2)
    keep_finished_checkpoints: bool = option("keep the checkpoints (optimizer state included) once the run has "
                                             "finished; by default only an unfinished run keeps them", default=False)
    resume: bool = option("continue from the newest checkpoint in out/checkpoints if there is one", default=True)
    device: str = option("cpu or cuda (with torchrun: each rank takes cuda:LOCAL_RANK)", default="cpu")
    bf16: bool = option("bf16 autocast on CUDA (trainable weights and optimizer stay fp32)", default=True)
    cpu_bf16: bool = option("bf16 autocast on CPU too (with bf16: about 3x faster matmuls on CPUs with "
                            "AVX512-BF16 or AMX, e.g. Zen 4, Sapphire Rapids)", default=False)

    def check(self) -> None:
        if not self.out:
            raise ValueError("out (the output directory) is required")
        for name in ("steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True)
class LoRAOptions:
    """LoRA options of the retriever and generator stages (paper defaults)."""

    r: int = option("LoRA rank", default=32)
    alpha: float = option("LoRA alpha (scaling alpha / r)", default=64.0)
    dropout: float = option("dropout on the LoRA input, as peft's lora_dropout", default=0.1)
    target_modules: list = option("modules that get LoRA", default_factory=lambda: list(TARGET_MODULES))
    init_adapter: Optional[str] = option("start from this PEFT adapter (same r, alpha, modules)", default=None)
    epochs: float = option("if > 0: passes over the training examples, overriding steps", default=0.0)

    def lora_spec(self) -> "LoRASpec":
        from ..model.backbone import LoRASpec

        return LoRASpec(r=self.r, alpha=float(self.alpha), dropout=self.dropout, targets=tuple(self.target_modules))

    def resolve_steps(self, num_examples: int, per_step: int) -> None:
        """Turn epochs (if set) into optimizer steps: per_step examples each."""
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.epochs > 0:
            self.steps = max(1, math.ceil(self.epochs * num_examples / per_step))


@dataclass(kw_only=True)
class PromptOptions:
    """How QA records become prompts (as bsharedrag ask builds them)."""

    template: str = option("prompt template: en, zh, or a file with {context} and {question}", default="en")
    k: int = option("contexts per prompt (the top-k retrieved)", default=3)
    context_tokens: int = option("token budget of the contexts", default=768)
    max_length: Optional[int] = option("longest prompt + answer (default: the model's max_position_embeddings)",
                                      default=None)
    max_answer_tokens: int = option("longest answer incl. EOS; longer ones are an error that lists them all",
                                    default=1024)
    chat: Optional[bool] = option("prompts as the user turn of the model's chat template "
                                  "(default: when the tokenizer has one)", default=None)

    def template_text(self) -> str:
        from ..rag.pipeline import read_template

        return read_template(self.template)

    def chat_for(self, tok: "Tokenizer") -> bool:
        return bool(tok.chat_template) if self.chat is None else self.chat

    def saver(self, model, base: str, tok: "Tokenizer"):
        """Writes the adapter and, beside it, the prompt format it learned (rag.PROMPT_FILE)."""
        from ..rag.pipeline import save_prompt_format

        def save(out: str) -> None:
            model.save_lora(out, base)
            save_prompt_format(out, self.template_text(), self.chat_for(tok))
        return save


@dataclass(kw_only=True)
class GeneratorConfig(PromptOptions, LoRAOptions, LoopConfig):
    model: str = option("HF model directory (the continually pre-trained backbone)")
    data: str = option('QA JSONL: {"question", "answer", "contexts": [{"title", "text"}]} or "doc_ids" + --corpus')
    corpus: Optional[str] = option("corpus JSONL (BEIR corpus.jsonl) that doc_ids refer to", default=None)
    general: Optional[str] = option('general instruction JSONL: {"instruction", "input"?, "output"}', default=None)
    general_ratio: float = option("fraction of examples drawn from the general instruction data", default=0.0)
    batch_size: int = option("examples per micro-batch, all processes together", default=8)

    def check(self) -> None:
        super().check()
        if not self.model or not self.data:
            raise ValueError("model and data are required")
        if not 0.0 <= self.general_ratio <= 1.0:
            raise ValueError(f"general_ratio must be in [0, 1], got {self.general_ratio}")
        if self.general_ratio > 0 and not self.general:
            raise ValueError(f"general_ratio={self.general_ratio} needs general instruction data (general)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class RetrieverConfig(PromptOptions, LoRAOptions, LoopConfig):
    model: str = option("HF model directory (the continually pre-trained backbone)")
    data: str = option("BEIR directory (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) or a triples JSONL")
    split: str = option("qrels split of a BEIR directory", default="train")
    negatives: Optional[str] = option("mined negatives JSONL (bsharedrag mine-negatives) for BEIR data",
                                     default=None)
    num_negatives: int = option("hard negatives per query", default=7)
    temperature: float = option("InfoNCE temperature", default=0.01)
    # mean, not RepLLaMA's last token: on smollm2-135m (WorthBuying-mini, 30 steps, 2 seeds each)
    # last-token pooling stayed at chance (nDCG@5 0.02-0.10, also at temperature 0.05) while
    # mean pooling reached 0.82-0.85; the choice is saved beside the adapter (rag.EMBEDDING_FILE)
    pooling: str = option("how a sequence becomes its embedding: mean, last (the EOS token) or cls; saved "
                          "beside the adapter, where index, ask, eval and serve read it", default="mean")
    query_prefix: str = option("text put before each query", default="query: ")
    passage_prefix: str = option("text put before each passage", default="passage: ")
    query_max_len: int = option("longest query in tokens (EOS included; longer ones are cut)", default=64)
    passage_max_len: int = option("longest passage in tokens (EOS included; longer ones are cut): what "
                                  "--max-length is to index, eval and mine-negatives", default=512)
    batch_size: int = option("queries per micro-batch, all processes together", default=8)
    fully_shared: bool = option("Fully-shared RAG baseline: one LoRA on retrieval + generation losses",
                               default=False)
    gen_data: Optional[str] = option("QA JSONL for fully_shared (as train generator's data)", default=None)
    gen_corpus: Optional[str] = option("corpus JSONL that gen_data's doc_ids refer to", default=None)
    gen_batch_size: int = option("generation examples per micro-batch (fully_shared)", default=8)
    gen_weight: float = option("loss = retrieval + gen_weight * generation (fully_shared)", default=1.0)
    full_finetune: bool = option("train every weight, no LoRA, and save a whole HF model: a separate "
                                "embedder model (the Separate RAG baseline)", default=False)

    def check(self) -> None:
        super().check()
        if not self.model or not self.data:
            raise ValueError("model and data are required")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.pooling not in MODES:
            raise ValueError(f"pooling must be one of {MODES}, got {self.pooling!r}")
        for name in ("query_max_len", "passage_max_len"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (a token and EOS), got {getattr(self, name)}")
        if self.batch_size < 1 or self.gen_batch_size < 1:
            raise ValueError("batch_size and gen_batch_size must be >= 1")
        if self.fully_shared and not self.gen_data:
            raise ValueError("fully_shared needs gen_data (QA JSONL for the generation loss)")
        if self.full_finetune and (self.fully_shared or self.init_adapter):
            raise ValueError("full_finetune trains a whole model: it excludes fully_shared and init_adapter")
        if self.negatives and not os.path.isdir(self.data):
            raise ValueError("negatives (a mined file) go with BEIR data; triples carry their own negatives")


@dataclass(kw_only=True)
class PretrainConfig(LoopConfig):
    model: str = option("HF model directory to start from (config.json, *.safetensors, tokenizer.json)")
    domain: list = option("JSONL file(s) of domain text, {\"text\": ...} per line", default_factory=list)
    general: list = option("JSONL file(s) of general text, {\"text\": ...} per line", default_factory=list)
    domain_ratio: Optional[float] = option("fraction of rows drawn from the domain corpora (default: 0.5 with "
                                           "both kinds of corpora, else all from the kind given)", default=None)
    seq_len: int = option("tokens per row (documents packed, never attending across each other)", default=512)
    batch_size: int = option("rows per micro-batch, all processes together", default=8)
    lr: float = option("peak learning rate of AdamW", default=2e-5)

    def check(self) -> None:
        super().check()
        if not self.model:
            raise ValueError("model (the HF model directory) is required")
        if not self.domain and not self.general:
            raise ValueError("give at least one domain or general JSONL corpus")
        if self.domain_ratio is None:  # only one kind given: every row comes from it
            self.domain_ratio = 0.5 if self.domain and self.general else float(bool(self.domain))
        if not 0.0 <= self.domain_ratio <= 1.0:
            raise ValueError(f"domain_ratio must be in [0, 1], got {self.domain_ratio}")
        if (self.domain_ratio > 0 and not self.domain) or (self.domain_ratio < 1 and not self.general):
            need = "domain" if self.domain_ratio > 0 and not self.domain else "general"
            raise ValueError(f"domain_ratio={self.domain_ratio} draws from the {need} corpora, but none are given")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
