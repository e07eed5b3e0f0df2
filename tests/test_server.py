"""`bsharedrag serve` as a real process on loopback, driven by the official openai client and httpx.

One server process (tiny random Qwen2 + PEFT adapters + an HNSW index) is shared by the
tests; every answer is compared with the offline engine (SharedRuntime.embed / generate,
greedy; RAGPipeline.ask) on the same model in this process. The SIGTERM test ends the
server, so it runs last.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("hnswlib")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from bsharedrag_fast import Backbone, Tokenizer  # noqa: E402
from bsharedrag_fast.cli.main import main  # noqa: E402
from bsharedrag_fast.index.hnsw import HNSWIndex  # noqa: E402
from bsharedrag_fast.rag.pipeline import RAGPipeline  # noqa: E402
from bsharedrag_fast.engine.runtime import SharedRuntime  # noqa: E402
from tiny_models import rag_checkpoint  # noqa: E402

KEY = "test-key"
MAX_QUEUE = 40
BASE = "tiny"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
TEXTS = ["the quick brown fox", "shared backbone, retrieval and generation", "low rank adapters",
         "a lazy dog jumps over the fox", "one resident model", "query passage"]
DOCS = [
    {"_id": f"d{i}", "title": f"item {i}", "text": t}
    for i, t in enumerate([
        "the quick brown fox jumps over the lazy dog", "shared backbone, retrieval and generation",
        "low rank adapters share one resident model", "the lazy dog sleeps", "a brown fox runs",
    ])
]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    # 1200 positions: room for the long generations of the disconnect and drain tests
    rag_checkpoint(root, BASE, (("retrieval", 1, 4), ("generation", 2, 8), ("extra", 3, 4)), positions=1200)
    cfg_path = root / BASE / "tokenizer_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), chat_template=CHAT_TEMPLATE)))
    with open(root / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in DOCS)
    assert main(["index", "--model", str(root / BASE), "--retrieval-adapter", str(root / "retrieval"),
                 "--corpus", str(root / "corpus.jsonl"), "--out", str(root / "index")]) == 0  # fmt: skip
    return root


@pytest.fixture(scope="module")
def offline(assets):
    model = Backbone.from_pretrained(assets / BASE)
    for name in ("retrieval", "generation", "extra"):
        model.load_adapter(assets / name, name)
    return SharedRuntime(model, Tokenizer.from_pretrained(assets / BASE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, assets):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "bsharedrag_fast.cli", "serve", "--model", str(assets / BASE),
               "--served-model-name", BASE, "--adapter", f"retrieval={assets / 'retrieval'}",
               "--adapter", f"generation={assets / 'generation'}", "--index", str(assets / "index"),
               "--port", str(self.port), "--max-queue", str(MAX_QUEUE), "--max-tokens", "1000",
               "--max-request-bytes", "100000", "--log-level", "warning"]  # fmt: skip
        self.log = open(assets / f"server-{self.port}.log", "w+")
        env = dict(os.environ, BSHAREDRAG_API_KEY=KEY)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stats(self) -> dict:
        return self.http.get("/admin/stats").json()

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def wait_idle(self, timeout: float = 30.0) -> dict:
        deadline = time.time() + timeout
        while True:
            s = self.stats()
            if s["running"] == 0 and s["waiting"] == 0 and s["kv_cache_blocks_used"] == 0:
                return s
            assert time.time() < deadline, s
            time.sleep(0.05)


def _serve(assets):
    srv = Server(assets)
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()
    srv.log.close()


@pytest.fixture(scope="module")
def server(assets):
    yield from _serve(assets)


def _chat_ids(offline, messages):
    return offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _ref_text(offline, prompt, adapter="generation", n=8, **kw):
    return offline.generate([prompt], adapter=adapter, max_new_tokens=n, temperature=0.0, **kw)[0]


# ----------------------------------------------------------------------------- endpoints


def test_health_models_and_api_key(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # open for probes
    ids = [m.id for m in server.client.models.list().data]
    assert ids[0] == BASE and sorted(ids[1:]) == ["generation", "retrieval"]  # (reloads reorder the adapters)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/embeddings"), ("GET", "/admin/stats"),
                             ("POST", "/admin/adapters"), ("DELETE", "/admin/adapters/retrieval")):
            r = httpx.request(method, server.url + path, headers=headers, json={"model": BASE, "input": "x"})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in server.client.models.list().data] == ids  # nothing unloaded


def test_embeddings_match_offline(server, offline):
    for model, adapter in (("retrieval", "retrieval"), (BASE, None)):
        r = server.client.embeddings.create(model=model, input=TEXTS)  # the client asks for base64
        got = torch.tensor([d.embedding for d in r.data])
        torch.testing.assert_close(got, offline.embed(TEXTS, adapter=adapter), atol=1e-5, rtol=1e-5)
        assert [d.index for d in r.data] == list(range(len(TEXTS)))
        ids = [offline.tokenizer.encode("query: " + t) + [offline.tokenizer.eos_token_id] for t in TEXTS]
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    # float format, token-id input, the passage prefix and mean pooling (extensions)
    body = {"model": "retrieval", "input": TEXTS[0], "encoding_format": "float", "prefix": "passage: ",
            "pooling": "mean"}
    v = server.http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    ref = offline.embed([TEXTS[0]], adapter="retrieval", prefix="passage: ", pooling="mean")[0]
    torch.testing.assert_close(torch.tensor(v), ref, atol=1e-5, rtol=1e-5)
    r = server.client.embeddings.create(model="retrieval", input=[[5, 6, 7], [8, 9]])
    torch.testing.assert_close(torch.tensor([d.embedding for d in r.data]),
                               offline.embed([[5, 6, 7], [8, 9]], adapter="retrieval"), atol=1e-5, rtol=1e-5)


def test_completions_and_chat_match_offline(server, offline):
    prompts = ["the quick brown fox", "low rank adapters share"]
    r = server.client.completions.create(model="generation", prompt=prompts, max_tokens=10, temperature=0)
    refs = [_ref_text(offline, p, n=10) for p in prompts]
    assert [c.text for c in r.choices] == [x.text for x in refs]
    assert [c.finish_reason for c in r.choices] == [{"eos": "stop"}.get(x.finish_reason, x.finish_reason)
                                                    for x in refs]
    assert r.usage.completion_tokens == sum(len(x.token_ids) for x in refs)
    # token-id prompt, base model, a stop string cut from the greedy text
    ids = offline.tokenizer.encode(prompts[0])
    r = server.client.completions.create(model=BASE, prompt=ids, max_tokens=6, temperature=0, extra_body={
        "ignore_eos": True})
    assert r.choices[0].text == _ref_text(offline, ids, None, 6, eos_token_id=[]).text
    full = _ref_text(offline, prompts[1], n=10, eos_token_id=[]).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r = server.client.completions.create(model="generation", prompt=prompts[1], max_tokens=10, temperature=0,
                                         stop=[stop], extra_body={"ignore_eos": True})
    ref = _ref_text(offline, prompts[1], n=10, stop=stop, eos_token_id=[])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (ref.text, "stop")
    # seeded sampling, n=2: choice i samples with seed + i, like rt.generate(seed=s)
    r = server.client.completions.create(model="generation", prompt=prompts[0], max_tokens=8, temperature=0.9,
                                         top_p=0.9, n=2, seed=11, extra_body={"top_k": 40})
    refs = offline.generate([prompts[0]] * 2, max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=40, seed=11)
    assert [c.text for c in r.choices] == [x.text for x in refs]
    assert r.usage.prompt_tokens == len(offline.tokenizer.encode(prompts[0]))  # the prompt counts once
    # chat: the tokenizer's template
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a fox?"}]
    r = server.client.chat.completions.create(model="generation", messages=messages, max_tokens=12, temperature=0)
    ref = _ref_text(offline, _chat_ids(offline, messages), n=12)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(_chat_ids(offline, messages))


def test_streaming_matches_offline(server, offline):
    messages = [{"role": "user", "content": "tell me about the lazy dog"}]
    ref = _ref_text(offline, _chat_ids(offline, messages), n=30, eos_token_id=[])
    chunks = list(server.client.chat.completions.create(
        model="generation", messages=messages, max_tokens=30, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))  # fmt: skip
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([d for d in deltas if d]) > 3 and "".join(deltas) == ref.text  # streamed piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 30
    # completions stream with a stop string: the held-back text never leaks past the stop
    prompt = "shared backbone"
    full = _ref_text(offline, prompt, n=20, eos_token_id=[]).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    ref = _ref_text(offline, prompt, n=20, stop=stop, eos_token_id=[])
    chunks = list(server.client.completions.create(model="generation", prompt=prompt, max_tokens=20, temperature=0,
                                                   stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_rag_ask_matches_offline(server, offline, assets):
    index = HNSWIndex.load(str(assets / "index"))
    rag = RAGPipeline(offline, index, "retrieval", "generation", k=3, max_new_tokens=8)
    for q in ("what does the fox do?", "which model is shared?"):
        r = server.http.post("/v1/rag/ask", json={"question": q, "max_tokens": 8})
        assert r.status_code == 200, r.text
        body, ref = r.json(), rag.ask(q)
        assert body["answer"] == ref.text
        assert [s["id"] for s in body["sources"]] == [d for d, _ in ref.sources]
        assert [s["score"] for s in body["sources"]] == pytest.approx([s for _, s in ref.sources], abs=1e-5)
        assert body["sources"][0]["text"] == index.get(ref.sources[0][0])["text"]
    r = server.http.post("/v1/rag/ask", json={"question": "fox?", "k": 1, "max_tokens": 4})
    assert len(r.json()["sources"]) == 1


def test_stream_text_deltas_add_up_to_the_final_text(assets):
    """_TextStream against full decodes: random token ids (partial UTF-8 bytes included), one
    token per step as the engine emits them, stop strings checked as the runtime does (the
    token completing a stop never reaches the stream: the request finishes with it)."""
    from bsharedrag_fast.server.openai_routes import TextStream as _TextStream

    tok = Tokenizer.from_pretrained(assets / BASE)
    rng = torch.Generator().manual_seed(0)
    for trial in range(400):
        ids = torch.randint(3, tok.vocab_size, (int(torch.randint(1, 40, (1,), generator=rng)),), generator=rng)
        ids = ids.tolist()
        full = tok.decode(ids)
        stop = []
        if trial % 2 and len(full) > 4:
            i = trial % (len(full) - 2)
            stop = [full[i: i + 1 + trial % 4]]
        stream, out, final = _TextStream(tok, stop), "", full
        for j in range(1, len(ids) + 1):
            text = tok.decode(ids[:j])
            if stop and stop[0] in text:
                final = text[: text.find(stop[0])]
                break
            out += stream.update(ids[j - 1: j])
            assert full.startswith(out) and not (stop and stop[0] in out)
        assert out + stream.finish(final) == final, (ids, stop)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_4xx_with_openai_errors(server):
    big = "fox " * 30000  # > --max-request-bytes
    long_text = " ".join(["the quick brown fox"] * 400)  # > the model's 1200 positions
    cases = [
        ("POST", "/v1/completions", b'{"model": "generation", "prompt": "x"', 400, "invalid_json"),
        ("POST", "/v1/completions", b"[1, 2]", 400, "invalid_json"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": "x", "max_tokens": "5"}, 400, "invalid_value"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": 5}, 400, "invalid_value"),
        ("POST", "/v1/completions", {"model": "generation"}, 400, "invalid_value"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": "x", "max_tokens": 1001}, 400, "invalid_value"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": "x", "temperature": -1}, 400, "invalid_value"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": "x", "n": 65}, 400, "invalid_value"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": []}, 400, "invalid_value"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": [[]]}, 400, "invalid_value"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": [99999]}, 400, "invalid_value"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": long_text}, 400, "invalid_value"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": "x", "logprobs": 2}, 400,
         "unsupported_parameter"),
        ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found"),
        ("POST", "/v1/completions", {"model": "generation", "prompt": big}, 413, "request_too_large"),
        ("POST", "/v1/embeddings", {"model": "retrieval", "input": ""}, 400, "invalid_value"),
        ("POST", "/v1/embeddings", {"model": "retrieval", "input": long_text}, 400, "invalid_value"),
        ("POST", "/v1/embeddings", {"model": "retrieval", "input": ["x"] * 65}, 400, "batch_too_large"),
        ("POST", "/v1/embeddings", {"model": "retrieval", "input": "x", "dimensions": 3}, 400, "invalid_value"),
        ("POST", "/v1/embeddings", {"model": "retrieval", "input": [1.5]}, 400, "invalid_value"),
        ("POST", "/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model_not_found"),
        ("POST", "/v1/chat/completions", {"model": "generation", "messages": []}, 400, "invalid_value"),
        ("POST", "/v1/chat/completions", {"model": "generation", "messages": [{"role": "bot", "content": "x"}]},
         400, "invalid_value"),
        ("POST", "/v1/chat/completions", {"model": "generation", "messages": [{"role": "user", "content": "x"}],
                                          "tools": [{"type": "function"}]}, 400, "unsupported_parameter"),
        ("POST", "/v1/rag/ask", {"question": "  "}, 400, "invalid_value"),
        ("POST", "/v1/rag/ask", {"question": "x", "k": 0}, 400, "invalid_value"),
        ("GET", "/v1/nothing", None, 404, "not_found"),
        ("POST", "/admin/adapters", {"name": "x", "path": "/no/such/dir"}, 400, "invalid_value"),
        ("POST", "/admin/adapters", {"name": "bad name!", "path": "/tmp"}, 400, "invalid_value"),
        ("POST", "/admin/adapters", {"name": "retrieval", "path": "/tmp"}, 409, "adapter_exists"),
        ("DELETE", "/admin/adapters/nope", None, 404, "model_not_found"),
        ("DELETE", f"/admin/adapters/{BASE}", None, 400, "invalid_value"),
    ]  # fmt: skip
    for method, path, body, status, code in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
        r = server.http.request(method, path, headers={"Content-Type": "application/json"}, **kw)
        assert r.status_code == status, (path, body if not isinstance(body, dict) else list(body.items())[:3],
                                         r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert err["code"] == code, (path, err)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.embeddings.create(model="missing", input="x")
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="generation", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=100000)
    assert "Traceback" not in server.output()
    server.wait_idle()


def _bad_adapter(assets, tmp_name: str, config=None, scale=None):
    """A copy of the "extra" adapter with its config changed or its weights scaled (nan, 1e30)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = assets / tmp_name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(assets / "extra", out)
    if config is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps(dict(cfg, **config)))
    if scale is not None:
        sd = load_file(str(out / "adapter_model.safetensors"))
        first = sorted(sd)[0]
        sd[first] = sd[first] * scale
        save_file(sd, str(out / "adapter_model.safetensors"))
    return out


def test_odd_values_fail_alone_with_4xx(server, offline, assets):
    """Extreme sampling values are served (greedy below 1e-5) or refused with a 400; text that
    is not Unicode is a 400; bad adapters are refused and the served set stays as it was."""
    msgs = [{"role": "user", "content": "the quick brown fox"}]
    ref = offline.generate([_chat_ids(offline, msgs)], adapter="generation", max_new_tokens=8)[0]
    for extra in ({"temperature": 1e-40}, {"temperature": 1e-40, "repetition_penalty": 1e-300},
                  {"temperature": 0.7, "repetition_penalty": 1e-300, "top_p": 1e-9}, {"temperature": 2.0, "top_k": 1}):
        r = server.http.post("/v1/chat/completions", json={"model": "generation", "messages": msgs, "max_tokens": 8,
                                                           **extra})
        assert r.status_code == 200, (extra, r.text[:300])
        if extra.get("repetition_penalty") is None:  # greedy: the reference text
            assert r.json()["choices"][0]["message"]["content"] == ref.text
    raw = [
        (b'{"model": "generation", "prompt": "x", "temperature": NaN}', "temperature"),
        (b'{"model": "generation", "prompt": "x", "temperature": 0.5, "repetition_penalty": 1e999}',
         "repetition_penalty"),
        (b'{"model": "generation", "prompt": "x", "top_p": NaN}', "top_p"),
        (b'{"model": "generation", "prompt": "a \\ud800 b"}', "lone surrogate"),
    ]
    for body, what in raw:
        r = server.http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and what in r.json()["error"]["message"], (body, r.text[:300])
    for path, body in (("/v1/chat/completions", b'{"model": "generation", "messages": [{"role": "user", '
                                                b'"content": "\\udfff"}]}'),
                       ("/v1/embeddings", b'{"model": "retrieval", "input": ["fine", "\\ud83d"]}')):
        r = server.http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"], (path, r.text[:300])

    served = [m["id"] for m in server.http.get("/v1/models").json()["data"]]
    bad = {
        "regex": (dict(config={"target_modules": "(q_proj"}), "not a valid regular expression"),
        "int": (dict(config={"target_modules": ["q_proj", 3]}), "target_modules must be"),
        "exclude": (dict(config={"exclude_modules": 5}), "exclude_modules must be"),
        "alpha": (dict(config={"lora_alpha": float("inf")}), "finite number"),
        "nan": (dict(scale=float("nan")), "NaN or infinite"),
        "huge": (dict(scale=1e30), "magnitude"),
    }
    for name, (kw, what) in bad.items():
        path = _bad_adapter(assets, f"bad-{name}", **kw)
        r = server.http.post("/admin/adapters", json={"name": f"bad-{name}", "path": str(path)})
        assert r.status_code == 400 and what in r.json()["error"]["message"], (name, r.text[:300])
    assert [m["id"] for m in server.http.get("/v1/models").json()["data"]] == served
    # the RAG index's retrieval adapter is swapped only for one with the same content
    assert server.http.delete("/admin/adapters/retrieval").status_code == 200
    r = server.http.post("/admin/adapters", json={"name": "retrieval", "path": str(assets / "generation")})
    assert r.status_code == 400 and "not the retrieval adapter the RAG index was built with" in r.text, r.text
    copy = _bad_adapter(assets, "retrieval-copy")
    import shutil

    shutil.rmtree(copy)
    shutil.copytree(assets / "retrieval", copy)
    assert server.http.post("/admin/adapters", json={"name": "retrieval", "path": str(copy)}).status_code == 200
    assert server.http.post("/v1/rag/ask", json={"question": "fox?", "max_tokens": 2}).status_code == 200
    r = server.client.completions.create(model="generation", prompt="the quick brown fox", max_tokens=4, temperature=0)
    assert r.choices[0].text == _ref_text(offline, "the quick brown fox", n=4).text
    assert "Traceback" not in server.output()
    server.wait_idle()


def test_engine_failures_map_to_4xx_or_a_logged_500_with_an_id(caplog):
    from types import SimpleNamespace

    from bsharedrag_fast.engine.runtime import RequestFailed
    from bsharedrag_fast.server.errors import request_error

    err = request_error(SimpleNamespace(id=7, error=RequestFailed("request 7: sampling failed", status=400)))
    assert (err.status, err.message) == (400, "request 7: sampling failed")
    with caplog.at_level("ERROR", logger="bsharedrag.server"):
        err = request_error(SimpleNamespace(id=8, error=RequestFailed("request 8: logits are not finite")))
        bug = request_error(SimpleNamespace(id=9, error=IndexError("list index out of range")))
    assert err.status == 500 and "logits are not finite" in err.message
    assert bug.status == 500 and "IndexError" in bug.message and "out of range" not in bug.message
    for e, rid in ((err, 8), (bug, 9)):
        eid = e.message.split("error id ")[1][:12]
        assert any(eid in r.getMessage() and f"request {rid}" in r.getMessage() for r in caplog.records)


def test_serve_command_rejects_bad_arguments(assets, capsys):
    model = str(assets / BASE)
    assert main(["serve", "--model", model, "--adapter", "a=x", "--adapter", "a=y"]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["serve", "--model", model, "--adapter", f"{BASE}=x"]) == 2
    assert "base model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", model, "--adapter", "no-equals-sign"])
    with pytest.raises(SystemExit):
        main(["serve", "--model", model, "--max-queue", "0"])


def test_app_without_key_or_index(offline):
    """In process (Starlette's TestClient runs the lifespan, so the engine thread too): no
    --api-key leaves /v1 open and turns the admin endpoints off; no --index, no RAG."""
    from starlette.testclient import TestClient

    from bsharedrag_fast.server.app import Limits, create_app
    from bsharedrag_fast.server.engine import EngineDriver
    from bsharedrag_fast.server.metrics import ServerMetrics

    app = create_app(EngineDriver(offline, BASE, 8, ServerMetrics(offline)), Limits(max_request_bytes=1000))
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 200
        r = c.post("/v1/embeddings", json={"model": "retrieval", "input": TEXTS[0], "encoding_format": "float"})
        torch.testing.assert_close(torch.tensor(r.json()["data"][0]["embedding"]),
                                   offline.embed(TEXTS[:1], adapter="retrieval")[0], atol=1e-5, rtol=1e-5)
        for method, path in (("GET", "/admin/stats"), ("POST", "/admin/adapters"), ("DELETE", "/admin/adapters/x")):
            r = c.request(method, path)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        r = c.post("/v1/rag/ask", json={"question": "fox?"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_index"
        r = c.post("/v1/completions", content=b"x" * 2000, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = c.post("/v1/completions", content=b"{}", headers={"Content-Type": "application/json",
                                                              "Content-Length": "ten"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_header"
    assert not offline.has_pending()


# ----------------------------------------------------------------------------- disconnects, queue limit


def _long_stream(server, model="generation", max_tokens=1000):
    """A streaming request that runs for a while; returns (response, first data line)."""
    body = {"model": model, "prompt": "the quick brown fox", "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    cm = server.http.stream("POST", "/v1/completions", json=body)
    r = cm.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    first = next(line for line in lines if line.startswith("data:"))
    return cm, lines, first


def test_disconnect_cancels_and_frees_cache_and_queue_limit(server):
    cancelled = server.metric("bsharedrag_cancelled_requests_total")
    streams = [_long_stream(server) for _ in range(2)]
    s = server.stats()
    assert s["running"] == 2 and s["kv_cache_blocks_used"] > 0
    # 2 generating + 39 more would pass --max-queue 40: 429, nothing admitted
    r = server.http.post("/v1/embeddings", json={"model": "retrieval", "input": ["x"] * (MAX_QUEUE - 1)})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["Retry-After"]
    r = server.http.post("/v1/embeddings", json={"model": "retrieval", "input": ["x"] * (MAX_QUEUE - 2)})
    assert r.status_code == 200
    for cm, _, _ in streams:  # the clients go away mid-stream
        cm.__exit__(None, None, None)
    server.wait_idle()
    # a non-streaming client that gives up. Sampled, so that no prompt-lookup drafts shorten it:
    # greedy, this tiny model's 1000 tokens took 0.49 s on a Zen 4, sampled 0.89 s
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/completions", timeout=0.25, json={
            "model": "generation", "prompt": "the lazy dog", "max_tokens": 1000, "temperature": 1.0, "seed": 1,
            "ignore_eos": True})  # fmt: skip
    s = server.wait_idle()
    assert s["kv_cache_sequences"] == 0
    assert server.metric("bsharedrag_cancelled_requests_total") == cancelled + 3


# ----------------------------------------------------------------------------- hot-load, load test


async def _mixed_load(server, offline, n: int, concurrency: int, models=("retrieval", "generation")):
    """n requests (embeddings, completions, chat, alternating), `concurrency` at a time;
    every answer is checked against the offline engine."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    sem = asyncio.Semaphore(concurrency)
    emb_model, gen_model = models

    async def one(i):
        async with sem:
            text = f"{TEXTS[i % len(TEXTS)]} {i}"
            kind = i % 3
            if kind == 0:
                r = await client.embeddings.create(model=emb_model, input=text)
                return kind, text, torch.tensor(r.data[0].embedding)
            if kind == 1:
                r = await client.completions.create(model=gen_model, prompt=text, max_tokens=6 + i % 5, temperature=0)
                return kind, text, r.choices[0].text
            msgs = [{"role": "user", "content": text}]
            r = await client.chat.completions.create(model=gen_model, messages=msgs, max_tokens=6 + i % 5,
                                                     temperature=0)
            return kind, text, r.choices[0].message.content

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()
    t1 = time.perf_counter()
    refs = []  # the offline engine, all at once (greedy output does not depend on the batch)
    for i, (kind, text, _) in enumerate(results):
        if kind == 0:
            refs.append(offline.submit_embed(text, adapter=emb_model))
        else:
            prompt = text if kind == 1 else _chat_ids(offline, [{"role": "user", "content": text}])
            refs.append(offline.submit_generate(prompt, adapter=gen_model, max_new_tokens=6 + i % 5))
    offline.run_until_done()
    print(f"{n} requests: server {t1 - t0:.1f} s, offline {time.perf_counter() - t1:.1f} s")
    for i, ((kind, text, got), ref) in enumerate(zip(results, refs)):
        if kind == 0:
            torch.testing.assert_close(got, ref.result(), atol=1e-5, rtol=1e-5)
        else:
            assert got == ref.result().text, (i, kind, text)
    return results


def test_adapter_hot_load_and_unload_under_traffic(server, offline, assets):
    errors = []
    traffic = threading.Thread(target=_run_catching, args=(errors, _mixed_load(server, offline, 30, 8)))
    traffic.start()
    r = server.http.post("/admin/adapters", json={"name": "extra", "path": str(assets / "extra")})
    assert r.status_code == 200 and "extra" in r.json()["models"]
    v = server.client.embeddings.create(model="extra", input=TEXTS[:2])
    torch.testing.assert_close(torch.tensor([d.embedding for d in v.data]), offline.embed(TEXTS[:2], adapter="extra"),
                               atol=1e-5, rtol=1e-5)
    # unloading waits for the request using it, which finishes whole
    cm, lines, first = _long_stream(server, "extra", max_tokens=300)
    unload = {}

    def delete():
        r = server.http.delete("/admin/adapters/extra")
        unload.update(r=r, at=time.perf_counter())

    t = threading.Thread(target=delete)
    t.start()
    rest = [line for line in lines if line.startswith("data:")]
    stream_done = time.perf_counter()
    cm.__exit__(None, None, None)
    t.join(30)
    assert unload["r"].status_code == 200 and "extra" not in unload["r"].json()["models"]
    assert unload["at"] >= stream_done
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "length"
    with pytest.raises(openai.NotFoundError):
        server.client.embeddings.create(model="extra", input="x")
    traffic.join(120)
    assert not errors, errors
    server.wait_idle()


def _run_catching(errors: list, coro) -> list:
    try:
        asyncio.run(coro)
    except BaseException as e:  # reported by the test thread
        errors.append(repr(e))
    return []


def test_load_200_mixed_requests_32_concurrent(server, offline):
    asyncio.run(_mixed_load(server, offline, 200, 32))
    s = server.wait_idle()
    assert s["embed_rows"] > 0 and s["decode_rows"] > 0 and s["prefill_rows"] > 0


def test_metrics(server):
    # its own traffic: the test passes alone and in any order
    server.client.embeddings.create(model="retrieval", input=TEXTS[:2])
    for _ in range(3):
        server.client.chat.completions.create(model="generation", messages=[{"role": "user", "content": "fox"}],
                                              max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert server.http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    server.wait_idle()
    text = httpx.get(server.url + "/metrics").text
    for name in ("bsharedrag_queue_depth", "bsharedrag_running_generations", "bsharedrag_kv_cache_blocks_used",
                 "bsharedrag_tokens_per_second", "bsharedrag_time_to_first_token_seconds_bucket",
                 "bsharedrag_http_request_seconds_bucket", "bsharedrag_engine_step_seconds_bucket"):
        assert name in text, name
    for kind in ("embed", "prefill", "decode"):
        assert server.metric(f'bsharedrag_engine_rows_total{{kind="{kind}"}}') > 0
        assert server.metric(f'bsharedrag_step_rows_count{{kind="{kind}"}}') > 0
    assert server.metric("bsharedrag_generated_tokens_total") >= 24
    assert server.metric('bsharedrag_http_requests_total{route="/v1/chat/completions",status="200"}') >= 3
    assert server.metric('bsharedrag_http_requests_total{route="/v1/completions",status="404"}') >= 1
    assert server.metric("bsharedrag_kv_cache_blocks_used") == 0


def test_fuzz_the_api_from_its_openapi_schema(server, slow):
    """schemathesis draws requests for every operation of the server's OpenAPI schema: none
    may answer 5xx or hang. Bounded here; `pytest --slow` tries 10x more per operation."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    per_op = 200 if slow else 20
    seen: dict = {}
    for result in schema.get_all_operations():
        op = result.ok()
        if op.method.upper() == "DELETE":  # unloading a drawn name could take a served adapter away
            continue

        @settings(max_examples=per_op, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = min(case.body["max_tokens"], 16)  # bounded work per request
            r = case.call(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            seen.setdefault(op.label, []).append(r.status_code)
            assert r.status_code < 500, (op.label, case.body, r.text[:300])

        run()
    total = sum(len(v) for v in seen.values())
    print(f"fuzzed {total} requests over {len(seen)} operations; statuses: "
          f"{sorted(set(c for v in seen.values() for c in v))}")
    assert len(seen) >= 6 and total >= 6 * 10
    assert "Traceback" not in server.output()
    server.wait_idle()


# ----------------------------------------------------------------------------- shutdown (its own server)


@pytest.fixture
def own_server(assets):
    """A server of its own, for a test that ends it (the others share `server`, in any order)."""
    yield from _serve(assets)


def test_sigterm_drains_in_flight_requests(own_server, offline):
    server = own_server
    cm, lines, first = _long_stream(server, max_tokens=80)
    server.proc.send_signal(signal.SIGTERM)
    rest = [line for line in lines if line.startswith("data:")]
    cm.__exit__(None, None, None)
    assert rest[-1] == "data: [DONE]"  # the in-flight stream ran to its end
    text = json.loads(first[5:])["choices"][0]["text"] + "".join(json.loads(x[5:])["choices"][0]["text"]
                                                                   for x in rest[:-1])
    assert text == _ref_text(offline, "the quick brown fox", n=80, eos_token_id=[]).text
    assert server.proc.wait(30) == 0  # drained, then a clean exit
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)
