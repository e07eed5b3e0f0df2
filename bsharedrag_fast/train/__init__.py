"""Training: continual pre-training, the retrieval and generation LoRAs, the Fully-shared
baseline, hard-negative mining. Built on the runtime's kernels (ops.lora_linear, ops.pool).

The public names load on first use (PEP 562): the command line reads the stage options
(train/config.py, torch-free) without loading the trainers. No submodule is named like a
public name (continual pre-training is cpt.py, its entry point `pretrain`): importing a
submodule sets the package attribute of its name, which would hide the function."""
import importlib

# public name -> the module of this package that defines it
_PUBLIC = {
    "GeneratorConfig": "config", "PretrainConfig": "config", "RetrieverConfig": "config", "TrainResult": "loop",
    "init_checkpoint": "init", "mine_negatives": "mine", "pretrain": "cpt", "train_generator": "generator",
    "train_retriever": "retriever",
}  # fmt: skip
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_PUBLIC))
