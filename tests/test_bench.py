"""`bsharedrag bench` end to end on the tiny preset (a small workload), its bad-input paths, and the
random checkpoints / adapters of bsharedrag_fast.bench.synthetic against transformers + peft."""
import json
import math

import pytest
import torch
from safetensors import safe_open

from bsharedrag_fast import Backbone
from bsharedrag_fast.bench import synthetic
from bsharedrag_fast.bench.command import GOALS, run_bench
from bsharedrag_fast.bench.presets import SETUPS
from bsharedrag_fast.bench.peer_worker import token_chunks
from bsharedrag_fast.cli.main import main

WORK = ["--docs", "6", "--answers", "2", "--new-tokens", "4", "--threads", "1"]
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--preset", "tiny", "--quick", *WORK, "--out", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_bench_writes_json_and_plots(bench):
    out, res = bench
    assert res["preset"] == "tiny" and res["shape"]["hidden_size"] == synthetic.PRESETS["tiny"]["hidden_size"]
    assert res["device"] == "cpu" and res["memory_measure"] == "process RSS"
    assert res["workload"]["docs"] == 6 and res["workload"]["rounds"] == 1
    assert res["machine"]["load_average_before"] >= 0 and res["machine"]["threads"] >= 1
    assert list(res["setups"]) == list(SETUPS)
    for name in ("memory.png", "throughput.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bench_figures_follow_from_the_measurements(bench):
    _, res = bench
    w, rows = res["workload"], res["setups"]
    for row in rows.values():
        m, sec, t = row["memory"], row["seconds"], row["throughput"]
        assert m["resident_bytes"] > 0 and m["peak_bytes"] >= m["resident_bytes"] and m["weights_bytes"] > 0
        assert math.isclose(t["embed_docs_per_s"], w["docs"] / sec["embed"])
        assert math.isclose(t["embed_tokens_per_s"], w["doc_tokens"] / sec["embed"])
        assert math.isclose(t["mixed_requests_per_s"], (w["docs"] + w["answers"]) / sec["mixed"])
        # random weights, no eos: every answer runs its full length
        assert row["generated_tokens"] == {"generate": 2 * 4, "mixed": 2 * 4}
        assert math.isclose(t["generate_tokens_per_s"], 2 * 4 / sec["generate"])
    sh, sep, hf = rows["shared"], rows["separate"], rows["hf_peft"]
    r = res["ratios"]
    assert math.isclose(r["resident_shared_over_separate"],
                        sh["memory"]["resident_bytes"] / sep["memory"]["resident_bytes"])
    assert math.isclose(r["peak_shared_over_hf_peft"], sh["memory"]["peak_bytes"] / hf["memory"]["peak_bytes"])
    assert math.isclose(r["mixed_shared_over_separate"], sep["seconds"]["mixed"] / sh["seconds"]["mixed"])
    assert math.isclose(r["mixed_shared_over_hf_peft"], hf["seconds"]["mixed"] / sh["seconds"]["mixed"])
    hf_best = min(hf["seconds"]["mixed"], hf["seconds"]["embed"] + hf["seconds"]["generate"])
    assert math.isclose(r["mixed_shared_over_hf_peft_best"], hf_best / sh["seconds"]["mixed"])
    # two backbones hold about twice the weights of one backbone with both adapters
    assert 1.6 < sep["memory"]["weights_bytes"] / sh["memory"]["weights_bytes"] < 2.0
    assert sep["memory"]["resident_bytes"] > sh["memory"]["resident_bytes"]
    assert [g["goal"] for g in res["goals"]] == [g[0] for g in GOALS]
    for g, (_, key, bound, op) in zip(res["goals"], GOALS):
        assert g["value"] == r[key] and g["met"] == (r[key] <= bound if op == "<=" else r[key] >= bound)


def test_bench_setups_compute_the_same_outputs(bench):
    _, res = bench
    out = res["outputs"]
    assert out["reference"] == "shared"
    assert out["separate"] == {"embedding_max_abs_diff": 0.0, "answers_identical": 1.0}
    assert out["hf_peft"]["embedding_max_abs_diff"] < 1e-4


def test_bench_runs_a_given_model_and_adapters_on_a_subset_of_setups(tmp_path):
    cfg = synthetic.write_checkpoint(tmp_path / "model", dict(synthetic.PRESETS["tiny"], **SMALL))
    adapters = [str(tmp_path / name) for name in ("r", "g")]
    for seed, path in enumerate(adapters):
        synthetic.write_adapter(path, cfg, seed=seed, rank=2, alpha=4)
    out = tmp_path / "out"
    assert main(["bench", "--model", str(tmp_path / "model"), "--adapters", *adapters, "--setups", "shared",
                 "--quick", *WORK, "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    assert res["preset"] is None and res["model"] == str(tmp_path / "model")
    assert list(res["setups"]) == ["shared"] and res["workload"]["adapter_rank"] is None
    assert res["ratios"] == {} and res["goals"] == []  # nothing to compare with
    assert res["shape"]["hidden_size"] == SMALL["hidden_size"]
    assert (out / "memory.png").is_file() and (out / "throughput.png").is_file()


@pytest.mark.parametrize("argv, match", [
    (["--preset", "tiny", "--model", "x"], "not both"),
    (["--setups", "shared,bogus"], "setups"),
    (["--setups", "shared,shared"], "setups"),
    (["--docs", "0"], "docs"),
    (["--rounds", "0"], "rounds"),
    (["--max-batch-tokens", "32"], "max_batch_tokens"),
    (["--model", "/nonexistent/model"], "config.json"),
])
def test_bench_rejects_bad_arguments(argv, match, capsys):
    assert main(["bench", *argv]) == 2
    assert match in capsys.readouterr().err


def test_bench_rejects_adapters_without_config(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--adapters", str(tmp_path), str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize("kw, match", [(dict(preset="gpt-9"), "preset"), (dict(dtype="int8"), "dtype"),
                                       (dict(adapters=["a"]), "two directories"), (dict(rank=0), "rank"),
                                       (dict(device="tpu"), "device must be cpu or cuda")])
def test_run_bench_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        run_bench(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_run_bench_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        run_bench(device="cuda")


def test_run_bench_refuses_setups_whose_weights_do_not_fit(monkeypatch):
    from bsharedrag_fast.util import sysinfo

    one = synthetic.checkpoint_nbytes(synthetic.PRESETS["tiny"], torch.float32)
    monkeypatch.setattr(sysinfo, "available_memory_bytes", lambda: 2.5 * one)
    with pytest.raises(ValueError, match="4 copies"):  # shared 1 + separate 2 + hf_peft 1
        run_bench()
    with pytest.raises(ValueError, match="3 copies"):
        run_bench(setups=["separate", "shared"])


def test_run_bench_refuses_a_checkpoint_larger_than_the_temp_disk(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1))
    with pytest.raises(ValueError, match="TMPDIR"):
        run_bench(setups=["shared"])


def test_token_chunks_respect_the_padded_budget():
    seqs = [[1] * n for n in (3, 5, 2, 8, 1, 4)]
    chunks = token_chunks(seqs, 10)
    assert [s for c in chunks for s in c] == seqs
    assert all(len(c) * max(map(len, c)) <= 10 for c in chunks)
    assert token_chunks([[1] * 20], 10) == [[[1] * 20]]  # a row longer than the budget goes alone


# -- synthetic checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["qwen2-0.5b", "llama-3-8b"])
def test_random_checkpoint_and_adapter_match_transformers_and_peft(tmp_path, monkeypatch, preset):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(synthetic, "SHARD_BYTES", 20_000)  # shards, as the big presets get
    cfg = synthetic.write_checkpoint(tmp_path, dict(synthetic.PRESETS[preset], **SMALL))
    synthetic.write_adapter(tmp_path / "lora", cfg, seed=1, rank=4, alpha=8)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    with_bytes = 0
    for shard in set(index["weight_map"].values()):
        with safe_open(tmp_path / shard, framework="pt") as f:
            with_bytes += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert synthetic.checkpoint_nbytes(cfg, torch.float32) == with_bytes
    assert len(set(index["weight_map"].values())) > 2
    assert any(k.endswith("q_proj.bias") for k in index["weight_map"]) == preset.startswith("qwen2")
    assert ("lm_head.weight" in index["weight_map"]) == (not cfg["tie_word_embeddings"])

    ours = Backbone.from_pretrained(tmp_path)
    ours.load_adapter(tmp_path / "lora", "lora")
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path), tmp_path / "lora").eval()
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0]
    got = ours(ids[0], torch.tensor([0, 12], dtype=torch.int32), adapters=["lora"])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    with hf.disable_adapter(), torch.no_grad():
        base = hf(input_ids=ids).logits[0]
    assert (base - ref).abs().max() > 1e-3  # the adapter is not a no-op


def test_write_checkpoint_rejects_other_architectures(tmp_path):
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        synthetic.write_checkpoint(tmp_path, dict(SMALL, architectures=["MistralForCausalLM"]))


def test_write_adapter_rejects_rank_zero(tmp_path):
    with pytest.raises(ValueError, match="rank"):
        synthetic.write_adapter(tmp_path, dict(SMALL), seed=0, rank=0)


def test_token_workload_is_seeded_and_in_range():
    docs, prompts = synthetic.token_workload(50, docs=5, answers=3, seed=7)
    assert (docs, prompts) == synthetic.token_workload(50, docs=5, answers=3, seed=7)
    assert len(docs) == 5 and len(prompts) == 3
    assert all(16 <= len(d) <= 64 for d in docs) and all(32 <= len(p) <= 128 for p in prompts)
    assert all(3 <= t < 50 for s in docs + prompts for t in s)
