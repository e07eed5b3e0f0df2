"""`bsharedrag bench --peers`: ours against other engines, each in its own process.

CI has neither vLLM nor llama-cpp-python: there the run is ours against transformers+peft (the
reference of the output check), and the missing peers are skipped with a note. The peers'
own paths run in the committed benchmark (docs/benchmarks.md)."""
import json
import os
import sys

import pytest
from safetensors import safe_open

pytest.importorskip("peft")

from bsharedrag_fast.bench import peers  # noqa: E402
from bsharedrag_fast.cli.main import main  # noqa: E402
from bsharedrag_fast.model.gguf import inspect_gguf  # noqa: E402
from bsharedrag_fast.model.tokenizer import Tokenizer  # noqa: E402
from tiny_gguf import write_gguf  # noqa: E402
from tiny_models import rag_checkpoint, write_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    rag_checkpoint(root, positions=1024, adapters=())
    out = root / "out"
    # a Python without vllm: skipped with a note, whatever this machine has installed
    assert main(["bench", "--peers", "hf,vllm,llamacpp", "--base", str(root / "model"), "--quick",
                 "--threads", "1", "--vllm-python", "/nonexistent/python", "--out", str(out)]) == 0
    return out, json.loads((out / "peers.json").read_text())


def test_peer_bench_writes_json_and_plot_and_skips_what_is_missing(run):
    out, res = run
    assert list(res["engines"]) == ["ours", "ours-nodraft", "hf"]
    assert [(res["engines"][r]["dtype"], res["engines"][r]["speculate"]) for r in ("ours", "ours-nodraft")] == [
        ("float32", 4), ("float32", 0)]
    assert any(n.startswith("vllm skipped: no vllm importable by /nonexistent/python") for n in res["notes"])
    assert any(n.startswith("llamacpp skipped") for n in res["notes"])  # not installed, or no GGUF of a HF dir
    # the speed goals are against vLLM and llama.cpp; ours' peak RSS has a goal of its own: at
    # most what it holds (the checkpoint's tensors, adapters, KV budget) + 250 MB
    ours = res["engines"]["ours"]
    with safe_open(str(out.parent / "model" / "model.safetensors"), "pt") as f:
        assert ours["memory"]["backbone"] >= sum(f.get_tensor(k).nbytes for k in f.keys()) > 0
    assert ours["memory"]["lora_stacks"] > 0 and ours["memory"]["cache"] > 0  # 5 random adapters, the KV budget
    bound = ours["memory"]["total"] + 250 * 2**20
    assert res["goals"] == [{"goal": f"peak RSS: ours <= weights + KV budget + 250 MB = {bound / 2**20:.0f} MB",
                             "value": ours["peak_rss_bytes"] / 2**20, "unit": "MB",
                             "met": ours["peak_rss_bytes"] <= bound}]
    data = (out / "peers.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert res["machine"]["load_average_before"] >= 0 and res["threads"] == 1


def test_ours_reports_its_wait_policy_and_the_peers_get_their_own(run, monkeypatch):
    _, res = run
    # ours' worker imports torch before the package, so it runs on the variables it inherited from here
    inherited = "".join(f" {k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    assert res["engines"]["ours"]["omp_wait"] == "torch loaded first" + inherited
    from bsharedrag_fast.util import threads

    monkeypatch.setattr(threads, "WAIT_POLICY", "spin")  # the package set the variable ...
    monkeypatch.setenv("GOMP_SPINCOUNT", "30000")
    assert peers.engine_env("ours")["GOMP_SPINCOUNT"] == peers.engine_env("ours-nodraft")["GOMP_SPINCOUNT"] == "30000"
    assert "GOMP_SPINCOUNT" not in peers.engine_env("vllm") and "GOMP_SPINCOUNT" not in peers.engine_env("hf")
    monkeypatch.setattr(threads, "WAIT_POLICY", "user")  # ... the user did: every engine keeps it
    assert peers.engine_env("llamacpp")["GOMP_SPINCOUNT"] == "30000"


def test_the_peers_do_not_inherit_ours_onednn_cache_size(monkeypatch):
    from bsharedrag_fast.util import malloc

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
    monkeypatch.setattr(malloc, "SET_VARIABLES", ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])  # the package set it ...
    assert peers.engine_env("ours")["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    assert all("ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in peers.engine_env(e) for e in ("vllm", "hf", "llamacpp"))
    monkeypatch.setattr(malloc, "SET_VARIABLES", [])  # ... the user did: every engine keeps it
    assert peers.engine_env("vllm")["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"


def test_peer_bench_figures_follow_from_the_measurements(run):
    _, res = run
    rounds = res["sizes"]["rounds"]
    for name, row in res["engines"].items():  # ours without drafts: the single stream only
        assert set(row["workloads"]) == ({"single_stream"} if name == "ours-nodraft" else set(peers.WORKLOADS))
        assert row["peak_rss_bytes"] > 100 * 2**20
        for w, rec in row["workloads"].items():
            assert len(rec["seconds"]) == rounds and rec["seconds_min"] == min(rec["seconds"]) > 0
    hf, ours = res["engines"]["hf"]["workloads"], res["engines"]["ours"]["workloads"]
    for w in peers.WORKLOADS:
        assert res["speedup_ours_over"]["hf"][w] == pytest.approx(hf[w]["seconds_median"] / ours[w]["seconds_median"])
    plain = res["engines"]["ours-nodraft"]["workloads"]["single_stream"]["seconds_median"]
    assert res["speedup_ours_over"]["ours-nodraft"] == {
        "single_stream": pytest.approx(plain / ours["single_stream"]["seconds_median"])}
    s = res["sizes"]
    assert ours["generate"]["tokens_per_s"] == pytest.approx(s["prompts"] * s["new_tokens"]
                                                             / ours["generate"]["seconds_median"])
    assert ours["embed"]["texts_per_s"] == pytest.approx(s["texts"] / ours["embed"]["seconds_median"])
    assert ours["rag_mix"]["requests_per_s"] == pytest.approx((s["prompts"] + s["mix_texts"])
                                                              / ours["rag_mix"]["seconds_median"])
    assert ours["index"]["documents_per_s"] == pytest.approx(s["index_docs"] / ours["index"]["seconds_median"])


def test_ours_and_transformers_peft_compute_the_same_outputs(run):
    _, res = run
    check = res["outputs"]
    assert check["reference"] == "hf"
    n = res["sizes"]["prompts"]
    for w in ("generate", "generate_lora", "generate_4loras", "rag_mix"):
        assert check["ours"][f"{w}_answers_identical"] == f"{n}/{n}"
    assert check["ours"]["single_stream_answers_identical"] == "1/1"
    assert check["ours-nodraft"] == {"single_stream_answers_identical": "1/1", "single_stream_mean_common_prefix": 1.0}
    for w in ("embed", "embed_lora", "rag_mix", "index"):  # index: `bsharedrag index`'s loop against HF's vectors
        assert check["ours"][f"{w}_min_cosine"] > 0.999


def test_a_bfloat16_run_sets_ours_beside_its_own_fp32(tmp_path):
    # below float32 ours does not draft, so its no-draft row would repeat it: the row beside it
    # is the same engine on float32 weights, and the bf16 goal is measured against that
    rag_checkpoint(tmp_path, positions=1024, adapters=())
    res = peers.run_peer_bench(model=str(tmp_path / "model"), peers=[], quick=True, dtype="bfloat16", threads=1,
                               workloads=["single_stream"])
    assert list(res["engines"]) == ["ours", "ours-fp32"]
    ours, fp32 = res["engines"]["ours"], res["engines"]["ours-fp32"]
    assert (ours["dtype"], ours["speculate"]) == ("bfloat16", 0)
    assert (fp32["dtype"], fp32["speculate"]) == ("float32", 0)
    ratio = fp32["workloads"]["single_stream"]["seconds_median"] / ours["workloads"]["single_stream"]["seconds_median"]
    assert res["goals"][0] == {"goal": "single_stream: ours >= 1.8x ours-fp32", "value": pytest.approx(ratio),
                               "met": ratio >= 1.8}
    assert [g["goal"].split(":")[0] for g in res["goals"][1:]] == ["peak RSS"]


def test_an_int8_run_sets_ours_beside_its_fp32_and_compares_with_llamacpp_only(tmp_path):
    rag_checkpoint(tmp_path, positions=1024, adapters=())
    res = peers.run_peer_bench(model=str(tmp_path / "model"), peers=["hf"], quick=True, dtype="int8", threads=1,
                               workloads=["single_stream"])
    assert list(res["engines"]) == ["ours", "ours-fp32"]
    assert (res["engines"]["ours"]["dtype"], res["engines"]["ours"]["speculate"]) == ("int8", 0)
    assert res["engines"]["ours-fp32"]["dtype"] == "float32"
    assert "hf skipped: an int8 run compares with llama.cpp's Q8_0 only" in res["notes"]
    assert [g["goal"].split(":")[0] for g in res["goals"]] == ["peak RSS"]  # no bf16 goal in an int8 run
    assert res["engines"]["ours"]["memory"]["backbone"] < 0.35 * res["engines"]["ours-fp32"]["memory"]["backbone"]


def test_agreement_reports_answers_that_part():
    outputs = {"hf": {"generate": ([[1, 2, 3, 4], [5, 6, 7, 8]], []), "embed": ([], [[1.0, 0.0], [0.0, 1.0]])},
               "x": {"generate": ([[1, 2, 3, 4], [5, 6, 0, 8]], []), "embed": ([], [[1.0, 0.0], [0.6, 0.8]])}}
    got = peers._agreement(outputs, "hf")["x"]
    assert got["generate_answers_identical"] == "1/2"
    assert got["generate_mean_common_prefix"] == pytest.approx((1 + 0.5) / 2)
    assert got["embed_min_cosine"] == pytest.approx(0.8)


def test_text_workload_lengths(tmp_path):
    write_tokenizer(tmp_path)
    sizes = dict(peers.SIZES["quick"], prompts=3, texts=5)
    work = peers.text_workload(Tokenizer.from_pretrained(tmp_path), sizes, 8)
    assert len(work["prompts"]) == 3 and work["single"] not in work["prompts"]
    assert len(work["texts"]) == 5
    assert all(peers.TEXT_TOKENS[0] <= len(t) <= peers.TEXT_TOKENS[1] for t in work["texts"])
    assert all(len(p) + 8 <= peers.MAX_MODEL_LEN for p in work["prompts"])
    tok = Tokenizer.from_pretrained(tmp_path)
    docs, ids = work["index_docs"], work["passages"]
    assert len(docs) == len(ids) == sizes["index_docs"] and len({d["id"] for d in docs}) == len(docs)
    for d, p in zip(docs, ids):  # as `bsharedrag index` embeds them: prefix, text, EOS
        assert p == tok.encode(f"passage: {d['title']} {d['text']}".strip(), add_special_tokens=True)[
            : peers.INDEX_MAX_LENGTH - 1] + [tok.eos_token_id]


def test_vllm_runs_the_rag_mix_as_an_embedder_and_a_generator_at_once():
    routes = peers._routes("vllm")
    assert routes["rag_mix"] == [("vllm-embed", ("embed",)), ("vllm-lora", ("generate",))]
    assert routes["generate"] == [("vllm", ("generate", "embed"))]  # base requests: the process without LoRA
    assert set(peers._routes("llamacpp-F32")) == {"generate", "single_stream", "first_token"}


def test_llamacpp_gets_the_weights_retyped_to_the_bench_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("BSHAREDRAG_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tok").mkdir()
    write_tokenizer(tmp_path / "tok")
    src = write_gguf(tmp_path / "tiny.gguf", tmp_path / "tok", types={"attn_q": "Q8_0", "ffn_up": "Q8_0"})
    files = peers.gguf_files(str(src), "float32", None)
    assert list(files) == ["llamacpp-F32", "llamacpp-F32+Q8_0"]  # its header says F32: named by its types
    assert inspect_gguf(files["llamacpp-F32"])["quant_types"] == ["F32"]
    assert files["llamacpp-F32"].startswith(str(tmp_path / "cache"))
    mtime = os.path.getmtime(files["llamacpp-F32"])
    assert peers.gguf_files(str(src), "float32", None) == files  # written once
    assert os.path.getmtime(files["llamacpp-F32"]) == mtime
    assert peers.gguf_files(str(tmp_path / "model"), "float32", None) == {}  # a HF directory: no GGUF


@pytest.mark.parametrize("argv, match", [
    (["--peers", "vllm,bogus"], "--peers must be distinct names"),
    (["--peers", "hf,hf"], "--peers must be distinct names"),
    (["--peers", "hf", "--workloads", "generate,nope"], "workloads must be names"),
    (["--peers", "hf", "--rounds", "0"], "rounds must be an int >= 1"),
    (["--peers", "hf", "--budget", "-1"], "budget must be >= 0"),
])
def test_peer_bench_rejects_bad_arguments(argv, match, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


def test_a_run_over_the_budget_is_not_repeated_and_the_profile_splits_ours(tmp_path):
    rag_checkpoint(tmp_path, positions=1024, adapters=())
    res = peers.run_peer_bench(model=str(tmp_path / "model"), peers=["hf"], quick=True, rounds=2, threads=1,
                               workloads=["generate", "generate_lora", "embed"], budget_s=0.0, profile=True)
    for row in ("ours", "hf"):
        assert [len(res["engines"][row]["workloads"][w]["seconds"]) for w in ("generate_lora", "embed")] == [1, 1]
    assert sum("one round, its first took" in n for n in res["notes"]) == 6
    assert set(res["engines"]["ours"]["workloads"]) == {"generate", "generate_lora", "embed"}
    prof = res["ours_profile"]
    assert set(prof) == {"generate", "generate_lora", "embed"}
    for p in prof.values():
        assert sum(p["share"].values()) == pytest.approx(1.0) and p["seconds"] > 0
        assert p["share"]["linear (base GEMMs, LM head)"] > 0.01 and p["share"]["attention"] > 0
    # base decode steps run their layers in one C++ call; steps with adapter rows and prefill do not
    assert prof["generate"]["share"]["decode layers in one C++ call"] > 0.01
    assert prof["generate_lora"]["share"]["decode layers in one C++ call"] == 0
    assert prof["generate_lora"]["share"]["LoRA shrink/expand"] > 0 and prof["generate_lora"]["share"]["sampling"] > 0
    assert prof["embed"]["share"]["pooling"] > 0 and prof["embed"]["share"]["sampling"] == 0


def test_a_peer_without_the_chosen_workloads_is_skipped_with_a_note(tmp_path, monkeypatch):
    # llama.cpp runs generation only: `--peers llamacpp --workloads embed` is ours alone
    rag_checkpoint(tmp_path, positions=1024, adapters=())
    monkeypatch.setattr(peers, "_has_module", lambda python, module: True)
    monkeypatch.setattr(peers, "gguf_files", lambda model, dtype, gguf: {"llamacpp-F32": "/nonexistent.gguf"})
    res = peers.run_peer_bench(model=str(tmp_path / "model"), peers=["llamacpp"], quick=True, threads=1,
                               workloads=["embed"])
    assert list(res["engines"]) == ["ours"] and res["speedup_ours_over"] == {}
    assert "llamacpp-F32 skipped: it runs none of the workloads embed" in res["notes"]


def test_a_peer_worker_that_exits_mid_run_is_noted_and_the_run_goes_on(tmp_path):
    # a stand-in for vLLM's Python: it finds the module, loads, then exits on its first request
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n"
                    "import json, os, sys\n"
                    "if sys.argv[1] == '-c':\n    sys.exit(0)\n"
                    "print('REPLY ' + json.dumps({'load_seconds': 0.0, 'pid': os.getpid()}), flush=True)\n"
                    "sys.stdin.readline()\nsys.exit(3)\n")
    fake.chmod(0o755)
    rag_checkpoint(tmp_path, positions=1024, adapters=())
    res = peers.run_peer_bench(model=str(tmp_path / "model"), peers=["vllm"], vllm_python=str(fake), quick=True,
                               threads=1, workloads=["generate", "embed"])
    assert set(res["engines"]["ours"]["workloads"]) == {"generate", "embed"}
    assert res["engines"]["vllm"]["workloads"] == {} and res["speedup_ours_over"] == {"vllm": {}}
    stopped = sorted(n for n in res["notes"] if " stopped: " in n)
    assert stopped == [f"{name} stopped: bench worker {name!r} exited with code 3 (its messages are above) during "
                       f"{w}; what it had left to run was skipped" for name, w in (("vllm", "generate"),
                                                                                   ("vllm-embed", "embed"))]
