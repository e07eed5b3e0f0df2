"""Decode steps from static buffers (engine/graphs.py): the path a CUDA graph captures.

Without a GPU it runs eagerly ("static") on CPU with the Triton kernels under
TRITON_INTERPRET=1, the GPU's own code: greedy tokens equal the engine's usual path (with two
LoRAs and base rows mixed, padded buckets, a sliding-window model), and the captured code
reads nothing back to the host (no .item() / .tolist() / .cpu() / bool() ...), checked by a
torch function mode that also proves it catches the usual path's reads. On a GPU the same
tests capture real CUDA graphs, under torch's sync debug mode.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bsharedrag_fast import Backbone, SharedRuntime
from bsharedrag_fast.engine.graphs import DecodeGraphs
from conftest import triton_device
from tiny_models import hf_model, peft_adapter

DEV = triton_device()
pytestmark = pytest.mark.skipif(DEV is None, reason="needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
MODE = "cuda" if DEV == "cuda" else "static"

# Tensor methods that read a device tensor back to the host (each one a sync on a GPU).
READS_BACK = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
              "masked_select", "unique", "bincount", "repeat_interleave", "_local_scalar_dense"}
OURS = (os.path.dirname(os.path.abspath(sys.modules["bsharedrag_fast"].__file__)),
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels"))


class ReadBacks(TorchFunctionMode):
    """Records the read-backs our code (the package and its kernels, not torch or triton's
    interpreter) makes while active, with the caller's file and line."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS_BACK:  # (not .to("cpu"): with every tensor on the CPU it cannot tell a read-back)
            f = sys._getframe(1)
            if f.f_code.co_filename.startswith(OURS):
                self.seen.append(f"{name} at {os.path.basename(f.f_code.co_filename)}:{f.f_lineno}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def triton_everywhere(monkeypatch):
    """The CUDA path's kernels on CPU too: Triton attention and LoRA under the interpreter."""
    import importlib

    attention = importlib.import_module("bsharedrag_fast.model.attention")
    lora_linear = importlib.import_module("bsharedrag_fast.ops.lora_linear")  # (ops.lora_linear is also a function)

    monkeypatch.setattr(attention, "ATTENTION", "kernel")
    monkeypatch.setattr(attention, "KERNEL_BACKEND", "triton")
    monkeypatch.setattr(lora_linear, "CPU_AUTO_BACKEND", "triton")


def _model(tmp_path, arch="llama", **overrides):
    hf = hf_model(arch, embed_scale=4.0, **overrides)
    hf.save_pretrained(tmp_path / "m")
    for name, seed, r in (("a", 1, 4), ("b", 2, 8)):
        peft_adapter(hf, tmp_path / name, seed, r=r, lora_alpha=2 * r)
    model = Backbone.from_pretrained(str(tmp_path / "m"), device=DEV)
    model.load_adapter(tmp_path / "a", "a")
    model.load_adapter(tmp_path / "b", "b")
    return model


def _generate(model, mode, prompts, adapters, max_new=9, **kw):
    rt = SharedRuntime(model, decode_graphs=mode, block_size=4, **kw)
    handles = [rt.submit_generate(p, adapter=a, max_new_tokens=max_new, eos_token_id=[])
               for p, a in zip(prompts, adapters)]
    rt.run_until_done()
    return [h.result().token_ids for h in handles], rt


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("mistral", {"sliding_window": 5})])
def test_graph_decode_gives_the_engines_tokens(arch, overrides, tmp_path, triton_everywhere):
    """Greedy decoding through the static buffers (buckets 1, 2, 4, 8: 5 and then fewer
    sequences pad to 8, 4, 2) equals the engine's usual steps, token for token."""
    model = _model(tmp_path, arch, **overrides)
    g = torch.Generator().manual_seed(5)
    lens = (3, 9, 1, 6, 12)
    prompts = [torch.randint(3, 120, (n,), generator=g).tolist() for n in lens]
    adapters = ["a", None, "b", "a", None]
    want, _ = _generate(model, "off", prompts, adapters)
    got, rt = _generate(model, MODE, prompts, adapters)
    assert got == want and rt.stats["decode_rows"] > 0
    # requests of different lengths in one engine: the batch shrinks 5 -> 1 through the buckets
    rt = SharedRuntime(model, decode_graphs=MODE, block_size=4)
    max_new = [9, 4, 7, 2, 9]
    h = [rt.submit_generate(p, adapter=a, max_new_tokens=m, eos_token_id=[])
         for p, a, m in zip(prompts, adapters, max_new)]
    rt.run_until_done()
    assert [x.result().token_ids for x in h] == [w[:m] for w, m in zip(want, max_new)]


def test_graph_step_reads_nothing_back(tmp_path, triton_everywhere):
    """The code a CUDA graph captures (DecodeGraphs._forward) makes no host read-back; the
    engine's usual decode step does (LoRAMeta.build counts on the host), so the check bites."""
    model = _model(tmp_path)
    rt = SharedRuntime(model, decode_graphs=MODE, block_size=4)
    graphs = rt.graphs
    sids = [rt.cache.allocate() for _ in range(3)]
    from bsharedrag_fast.engine.step import run_step

    for i, sid in enumerate(sids):  # prompts in the cache
        run_step(model, torch.arange(3, 8 + i), torch.tensor([0, 5 + i], dtype=torch.int32), [sid], rt.cache)
    graphs.run(sids, [5, 6, 7], [0, -1, 1])  # capture (on CUDA), fill the buffers
    n = graphs.bucket(3)
    with ReadBacks() as reads, torch.inference_mode():
        graphs._forward(n)
    assert reads.seen == []
    with ReadBacks() as reads, torch.inference_mode():
        run_step(model, torch.tensor([1, 2, 3]), torch.arange(4, dtype=torch.int32), sids, rt.cache,
                 adapters=[0, -1, 1])
    assert any(s.startswith("tolist at lora_meta.py") for s in reads.seen), reads.seen
    if DEV == "cuda":  # the real thing: replay under torch's sync debug mode
        torch.cuda.set_sync_debug_mode("error")
        try:
            graphs._graphs[n][0].replay()
            graphs._forward(n)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_graph_inputs_are_checked_and_failures_restore_the_cache(tmp_path, triton_everywhere):
    model = _model(tmp_path)
    rt = SharedRuntime(model, decode_graphs=MODE, block_size=4)
    graphs, cache = rt.graphs, rt.cache
    sid = cache.allocate()
    free = cache.num_free_blocks
    with pytest.raises(ValueError, match="adapter slot 2 is outside"):
        graphs.run([sid], [3], [2])
    with pytest.raises(ValueError, match="1..256 sequences"):
        graphs.run([], [], [])
    assert cache.length(sid) == 0 and cache.num_free_blocks == free
    assert graphs.takes([sid]) and not graphs.takes([]) and not graphs.takes([sid] * 257)
    with pytest.raises(ValueError, match="decode_graphs must be one of"):
        SharedRuntime(model, decode_graphs="yes")
    if DEV != "cuda":
        with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
            DecodeGraphs(model, cache, "cuda")


def test_adapter_swap_recaptures(tmp_path, triton_everywhere):
    """The resident adapters' tensors are baked into a graph: after an unload (slots shift:
    "b" moves to slot 0) the same engine's graphs follow the new stacks."""
    model = _model(tmp_path)
    prompts, adapters = [[5, 9, 11], [7, 3]], ["b", None]
    rt = SharedRuntime(model, decode_graphs=MODE, block_size=4)

    def gen():
        h = [rt.submit_generate(p, adapter=a, max_new_tokens=9, eos_token_id=[]) for p, a in zip(prompts, adapters)]
        rt.run_until_done()
        return [x.result().token_ids for x in h]

    want, _ = _generate(model, "off", prompts, adapters)
    assert gen() == want
    model.unload_adapter("a")
    assert gen() == want
    if DEV == "cuda":
        assert rt.graphs.captures >= 2


def test_cuda_graphs_flag_needs_a_cuda_device(capsys):
    from bsharedrag_fast.cli.main import main

    assert main(["generate", "--model", "smollm2-135m", "--cuda-graphs", "Hello"]) == 2
    assert "--cuda-graphs needs --device cuda, got --device cpu" in capsys.readouterr().err
