"""Training: continual pre-training, the retrieval and generation LoRAs, the Fully-shared
baseline, hard-negative mining. Built on the runtime's kernels (ops.lora_linear, ops.pool)."""
from .generator import GeneratorConfig, train_generator
from .init import init_checkpoint
from .loop import TrainResult
from .mine import mine_negatives
from .pretrain import PretrainConfig, pretrain
from .retriever import RetrieverConfig, train_retriever

__all__ = ["GeneratorConfig", "PretrainConfig", "RetrieverConfig", "TrainResult", "init_checkpoint",
           "mine_negatives", "pretrain", "train_generator", "train_retriever"]
