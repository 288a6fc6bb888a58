"""`tuneoff serve` on the tiny model: a real server in a subprocess, spoken to over HTTP on 127.0.0.1.

The adapters are tiny LoRAs made here with non-zero B matrices, so each one changes what the
model says; the server holds at most two at a time, so a third one evicts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from tuneoff.core.errors import TuneoffError
from tuneoff.evaluation.generate import generate
from tuneoff.serving.catalog import AdapterSpec, check_name, from_registry
from tuneoff.serving.server import free_port

TOKEN = "test-admin-token"
API_KEY = "test-api-key"
PROMPT = [{"role": "system", "content": "Extract the support request as JSON."},
          {"role": "user", "content": "Hi, I want a refund for my kettle. Ref: ORD-22991."}]
OTHER_PROMPTS = [[{"role": "user", "content": text}] for text in
                 ("Where is my order ORD-11?", "Currency of Japan?", "cancel it please, urgent", "hello")]


def make_adapter(base_dir: Path, out: Path, seed: int, target_modules: list[str], rank: int) -> Path:
    """A LoRA adapter whose A and B are random (PEFT's default B = 0 would change nothing), scaled
    up (alpha = 32 r) so that the tiny model's greedy answer visibly changes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=32 * rank, target_modules=target_modules, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> Path:
    """An adapter root: alpha, beta (q/v) and gamma (o_proj) on the tiny base, delta a copy of
    alpha, wrong_base an adapter for another architecture, not_an_adapter a plain folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_base, root / "alpha", 1, ["q_proj", "v_proj"], 4)
    make_adapter(tiny_base, root / "beta", 2, ["q_proj", "v_proj"], 8)
    make_adapter(tiny_base, root / "gamma", 3, ["o_proj"], 4)
    shutil.copytree(root / "alpha", root / "delta")
    other = root / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    make_adapter(other, root / "wrong_base", 4, ["q_proj", "v_proj"], 4)
    (root / "not_an_adapter").mkdir()
    (root / "not_an_adapter" / "notes.txt").write_text("hello")
    return root


@contextmanager
def running_server(tiny_base: Path, tmp_path_factory, flags: list[str], env: dict):
    """`tuneoff serve` on the tiny base in a subprocess, as (client, log file); stopped (SIGTERM) after.
    It runs in a folder of its own, so no ./registry is served."""
    port = free_port()
    folder = tmp_path_factory.mktemp("serve")
    log = folder / "server.log"
    cmd = [sys.executable, "-m", "tuneoff.cli", "serve", "--base", str(tiny_base), "--port", str(port),
           "--max-new-tokens", "32", "--threads", "1", *flags]
    with open(log, "w") as out:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNEOFF_ADMIN_TOKEN": "", "TUNEOFF_SERVE_API_KEY": "", **env}
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, f"server did not start:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)
    yield client, log
    client.close()
    proc.terminate()
    # uvicorn shuts down cleanly on SIGTERM, then re-raises the signal: the exit status is -SIGTERM
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    assert "Application shutdown complete" in log.read_text()


@pytest.fixture(scope="module")
def server(tiny_base, adapters, tmp_path_factory):
    """The server, started with three adapters and room for two."""
    flags = ["--adapter", f"alpha={adapters / 'alpha'}", "--adapter", f"beta={adapters / 'beta'}",
             "--adapter", f"gamma={adapters / 'gamma'}", "--max-adapters", "2", "--adapter-root", str(adapters),
             "--batch-wait-ms", "250"]
    with running_server(tiny_base, tmp_path_factory, flags, {"TUNEOFF_ADMIN_TOKEN": TOKEN}) as (client, _):
        yield client


def chat(client, model: str, messages=PROMPT, **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 12, **extra})


def reply(client, model: str, messages=PROMPT, **extra) -> str:
    response = chat(client, model, messages, **extra)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def admin(token: str | None = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def merged_reply(base_dir: Path, adapter_dir: Path | None, tokenizer, messages=PROMPT) -> str:
    """What evaluation's generate() says with the adapter merged into the base (or the base alone)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return generate(model, tokenizer, [messages], batch_size=1, max_new_tokens=12, dev=torch.device("cpu"),
                    label="merged")[0]


def test_routing_and_merged_equivalence(server, tiny_base, adapters, tokenizer):
    served = {name: reply(server, name) for name in ("base", "alpha", "beta", "gamma")}
    assert len(set(served.values())) == 4, served  # each adapter changes the answer, and differently
    # greedy: the served adapter says exactly what the merged model says under evaluation's generate()
    assert served["alpha"].strip() == merged_reply(tiny_base, adapters / "alpha", tokenizer)
    assert served["gamma"].strip() == merged_reply(tiny_base, adapters / "gamma", tokenizer)
    assert served["base"].strip() == merged_reply(tiny_base, None, tokenizer)
    body = chat(server, "alpha").json()
    assert body["object"] == "chat.completion" and body["model"] == "alpha"
    assert body["usage"]["completion_tokens"] == 12 and body["choices"][0]["finish_reason"] == "length"


def test_mixed_adapter_batch_equals_one_at_a_time(server):
    jobs = [(model, messages) for model in ("base", "alpha", "beta") for messages in OTHER_PROMPTS[:2]]
    alone = [reply(server, model, messages) for model, messages in jobs]
    before = server.get("/stats").json()["batches"]
    together: list[str | None] = [None] * len(jobs)

    def ask(i):
        together[i] = reply(server, *jobs[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.get("/stats").json()["batches"]
    assert together == alone
    assert after["mixed_adapters"] > before["mixed_adapters"]  # base, alpha and beta rows shared a batch
    assert after["max_models_in_one"] == 3
    assert after["count"] - before["count"] < len(jobs)


def resident(client) -> list[str]:
    return client.get("/stats").json()["resident_adapters"]  # least recently used first


def test_lru_eviction(server):
    reply(server, "alpha")
    reply(server, "beta")
    assert resident(server) == ["alpha", "beta"]
    evictions = server.get("/stats").json()["adapter_evictions"]
    reply(server, "gamma")  # over the cap of 2: alpha, the least recently used, goes
    assert resident(server) == ["beta", "gamma"]
    reply(server, "beta")  # beta is now the most recent
    assert resident(server) == ["gamma", "beta"]
    first = reply(server, "alpha")  # known but not resident: it loads again, evicting gamma
    assert resident(server) == ["beta", "alpha"]
    stats = server.get("/stats").json()
    assert stats["adapter_evictions"] == evictions + 2
    assert first == reply(server, "alpha")  # reloaded, it says the same
    listed = {m["id"]: m["resident"] for m in server.get("/v1/models").json()["data"]}
    assert listed == {"base": True, "alpha": True, "beta": True, "gamma": False}


def test_admin_needs_the_token(server):
    body = {"name": "delta", "path": "delta"}
    missing = server.post("/admin/adapters", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert server.post("/admin/adapters", json=body, headers=admin("wrong")).status_code == 403
    assert server.get("/admin/adapters").status_code == 401
    assert server.delete("/admin/adapters/alpha", headers=admin("wrong")).status_code == 403
    assert "delta" not in [m["id"] for m in server.get("/v1/models").json()["data"]]
    assert reply(server, "alpha")  # the refused delete did nothing


def test_admin_load_and_unload(server):
    alpha = reply(server, "alpha")
    loaded = server.post("/admin/adapters", json={"name": "delta", "path": "delta"}, headers=admin())
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["resident"] is True
    assert reply(server, "delta") == alpha  # delta is a copy of alpha's folder
    again = server.post("/admin/adapters", json={"name": "delta", "path": "beta"}, headers=admin())
    assert again.status_code == 409
    swapped = server.post("/admin/adapters", json={"name": "delta", "path": "beta", "replace": True}, headers=admin())
    assert swapped.status_code == 201, swapped.text
    assert reply(server, "delta") == reply(server, "beta")
    listing = server.get("/admin/adapters", headers=admin()).json()
    assert {a["id"] for a in listing["adapters"]} == {"alpha", "beta", "gamma", "delta"}
    assert sum(a["resident"] for a in listing["adapters"]) == 2
    deleted = server.delete("/admin/adapters/delta", headers=admin())
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    gone = chat(server, "delta")
    assert gone.status_code == 404 and "delta" not in gone.json()["error"]["available"]
    assert server.delete("/admin/adapters/delta", headers=admin()).status_code == 404


@pytest.mark.parametrize("body, where", [
    ({"name": "../evil", "path": "alpha"}, "name"),
    ({"name": "a.b", "path": "alpha"}, "name"),
    ({"name": "base", "path": "alpha"}, "name"),
    ({"name": "__base__", "path": "alpha"}, "name"),
    ({"name": "ok", "path": "../"}, "outside the adapter roots"),
    ({"name": "ok", "path": "/etc"}, "outside the adapter roots"),
    ({"name": "ok", "path": "alpha/../../.."}, "outside the adapter roots"),
    ({"name": "ok", "path": "escape"}, "outside the adapter roots"),  # a symlink out of the root
    ({"name": "ok", "path": "not_an_adapter"}, "adapter_config.json"),
    ({"name": "ok", "path": "wrong_base"}, "does not fit the base"),
    ({"name": "ok"}, "path: Field required"),
    ({"name": "ok", "path": "alpha", "extra": 1}, "extra: Extra inputs are not permitted"),
])
def test_admin_rejects_bad_names_and_paths(server, adapters, body, where):
    escape = adapters / "escape"
    if not escape.exists():
        escape.symlink_to(adapters.parent)
    response = server.post("/admin/adapters", json=body, headers=admin())
    assert response.status_code == 400, response.text
    assert where in response.json()["error"]["message"]
    assert "ok" not in [m["id"] for m in server.get("/v1/models").json()["data"]]


def test_unknown_adapter_is_404_with_the_names(server):
    response = chat(server, "no-such-adapter")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["available"] == ["base", "alpha", "beta", "gamma"]
    assert "available: base, alpha, beta, gamma" in error["message"]


@pytest.mark.parametrize("path, body, where", [
    ("/v1/chat/completions", b"{not json", "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", "valid dictionary"),
    ("/v1/chat/completions", {"messages": PROMPT}, "model: Field required"),
    ("/v1/chat/completions", {"model": "alpha"}, "messages: Field required"),
    ("/v1/chat/completions", {"model": "alpha", "messages": "hi"}, "messages: Input should be a valid list"),
    ("/v1/chat/completions", {"model": "alpha", "messages": []}, "messages: List should have at least 1 item"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": 7, "messages": PROMPT}, "model: Input should be a valid string"),
    ("/v1/chat/completions", {"model": "alpha", "messages": PROMPT, "max_tokens": "many"}, "max_tokens"),
    ("/v1/chat/completions", {"model": "alpha", "messages": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"model": "alpha", "messages": PROMPT, "max_tokens": 33}, "above this server's limit"),
    ("/v1/chat/completions", {"model": "alpha", "messages": PROMPT, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"model": "alpha", "messages": PROMPT, "max_tokens": 4, "min_tokens": 5},
     "min_tokens 5 is above max_tokens 4"),
    ("/v1/chat/completions", {"model": "alpha", "messages": PROMPT, "n": 2}, "n=2 is not supported"),
    ("/v1/chat/completions", {"model": "alpha", "messages": PROMPT, "logprobs": True}, "logprobs=true is not supported"),
    ("/v1/chat/completions", {"model": "alpha", "messages": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "order " * 600}]}, "context"),
    ("/v1/completions", {"model": "alpha"}, "prompt: Field required"),
    ("/v1/completions", {"model": "alpha", "prompt": 5}, "prompt"),
    ("/v1/completions", {"model": "alpha", "prompt": []}, "prompt"),
    ("/v1/completions", {"model": "alpha", "prompt": ["a", "b"], "stream": True}, "one prompt per streamed request"),
])
def test_malformed_requests_are_400_and_the_server_lives(server, path, body, where):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = server.post(path, **kwargs)
    assert response.status_code == 400, response.text
    assert where in response.json()["error"]["message"], response.json()
    assert server.get("/health").json()["status"] == "ok"


def test_completions_stop_and_stream(server, tokenizer):
    prompt = "Hi, I want a refund for my kettle."
    full = server.post("/v1/completions", json={"model": "beta", "prompt": prompt, "max_tokens": 12}).json()
    text = full["choices"][0]["text"]
    assert full["object"] == "text_completion" and full["choices"][0]["finish_reason"] == "length"
    assert full["usage"]["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = server.post("/v1/completions", json={"model": "beta", "prompt": prompt, "max_tokens": 12, "stop": stop}).json()
    assert cut["choices"][0] == {"index": 0, "text": text[: text.index(stop)], "logprobs": None, "finish_reason": "stop"}
    two = server.post("/v1/completions", json={"model": "beta", "prompt": [prompt, "hello"], "max_tokens": 12}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["choices"][0]["text"] == text

    whole = reply(server, "gamma")
    events = []
    with server.stream("POST", "/v1/chat/completions", json={"model": "gamma", "messages": PROMPT, "max_tokens": 12,
                                                            "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 3  # the text came in pieces, not at the end


def test_min_tokens_holds_off_the_end_of_sequence():
    from tuneoff.serving.engine import Request, Sampling, _MinTokens, _Row

    rows = [_Row(Request(None, [1], 8, (), Sampling(0, 1), min_tokens=m), tokenizer=None, eos_ids={2}) for m in (3, 0)]
    rows[0].tokens = [5, 6]  # 2 of its 3 tokens so far: the end must wait
    scores = _MinTokens(rows, {2})(torch.zeros(2, 1), torch.zeros(2, 4))
    assert scores[0, 2] == -float("inf") and scores[1, 2] == 0 and torch.all(scores[:, [0, 1, 3]] == 0)
    rows[0].tokens.append(7)
    assert _MinTokens(rows, {2})(torch.zeros(2, 1), torch.zeros(2, 4))[0, 2] == 0


def test_health_models_and_stats(server):
    assert server.get("/health").json() == {"status": "ok", "base": "base", "adapters": 3, "resident": 2}
    models = server.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["base", "alpha", "beta", "gamma"]
    assert all(m["parent"] == "base" for m in models["data"][1:])
    assert server.get("/no-such-route").status_code == 404
    stats = server.get("/stats").json()
    assert stats["requests"]["failed"] == 0 and stats["requests"]["completed"] > 20
    assert stats["load_seconds"]["count"] == stats["adapter_loads"] >= 4


def test_a_long_prompt_is_tokenized_off_the_event_loop(server):
    """/health answers at once while 190,000 characters (570,000 tokens here) are being tokenized: on the
    event loop, each of the 3 requests would hold up one /health for most of its time."""
    body = json.dumps({"model": "base", "prompt": "中文" * 95_000}, ensure_ascii=False).encode()
    durations, latencies = [], []

    def ask():
        for _ in range(3):
            start = time.perf_counter()
            response = server.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400 and "context" in response.json()["error"]["message"]
            durations.append(time.perf_counter() - start)

    asker = threading.Thread(target=ask)
    asker.start()
    while asker.is_alive():
        start = time.perf_counter()
        assert server.get("/health").status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.01)
    asker.join()
    assert len(durations) == 3
    slow = [latency for latency in latencies if latency > min(durations) / 2]
    assert len(slow) <= 1, (slow, durations)  # one slow /health: a busy machine


# -- a second server: API key, small caps, secrets ending in a newline, no adapter at start ----------

@pytest.fixture(scope="module")
def hardened(tiny_base, adapters, tmp_path_factory):
    """(client, log): /v1 behind an API key, a 4 KiB body cap, 1,000 prompt characters, a queue of 2,
    rank 4 at most, room for one adapter and none at start; both secrets as mounted from a file."""
    flags = ["--adapter-root", str(adapters), "--max-adapters", "1", "--max-queue", "2", "--max-body-bytes", "4096",
             "--max-prompt-chars", "1000", "--max-lora-rank", "4", "--batch-wait-ms", "250"]
    env = {"TUNEOFF_ADMIN_TOKEN": f"{TOKEN}\n", "TUNEOFF_SERVE_API_KEY": f" {API_KEY}\n"}
    with running_server(tiny_base, tmp_path_factory, flags, env) as (client, log):
        client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield client, log


def copy_adapter(adapters: Path, source: str, name: str, change) -> str:
    """A copy of the adapter `source` in the adapter root as `name`, its (config, tensors) changed in place."""
    from safetensors.torch import load_file, save_file

    if not (adapters / name).exists():
        shutil.copytree(adapters / source, adapters / name)
        config = json.loads((adapters / name / "adapter_config.json").read_text())
        tensors = load_file(adapters / name / "adapter_model.safetensors")
        change(config, tensors)
        (adapters / name / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, adapters / name / "adapter_model.safetensors")
    return name


def test_a_failed_first_adapter_load_leaves_the_base_working(hardened, adapters):
    client, _ = hardened
    assert client.get("/stats").json()["adapter_loads"] == 0  # this is the server's first adapter load
    base = reply(client, "base")
    # r 2 in the config, rank 4 in the weights: PEFT injects rank-2 layers, then fails to copy the weights in
    broken = copy_adapter(adapters, "alpha", "rank_mismatch", lambda config, tensors: config.update(r=2))
    response = client.post("/admin/adapters", json={"name": "partial", "path": broken}, headers=admin())
    assert response.status_code == 400 and "failed to load" in response.json()["error"]["message"], response.text
    assert "\n" not in response.json()["error"]["message"]
    assert reply(client, "base") == base


def test_adapter_rank_above_the_cap_is_refused(hardened):
    client, _ = hardened
    response = client.post("/admin/adapters", json={"name": "wide", "path": "beta"}, headers=admin())
    assert response.status_code == 400, response.text
    assert "adapter 'wide'" in response.json()["error"]["message"]
    assert "LoRA rank 8, above this server's --max-lora-rank 4" in response.json()["error"]["message"]
    assert "wide" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_admin_token_with_a_trailing_newline_in_the_env(hardened):
    client, _ = hardened
    assert client.get("/admin/adapters", headers=admin()).status_code == 200
    assert client.get("/admin/adapters", headers=admin(TOKEN + "x")).status_code == 403


def test_v1_needs_the_api_key_and_health_does_not(hardened):
    client, _ = hardened
    url = str(client.base_url)
    assert client.get("/v1/models").status_code == 200  # the key from the env, stripped of its space and newline
    for headers in ({}, {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": f"Basic {API_KEY}"}):
        for response in (httpx.get(f"{url}/v1/models", headers=headers), httpx.get(f"{url}/stats", headers=headers),
                         httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "hi"}, headers=headers)):
            assert response.status_code == 401, response.text
            assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/openapi.json").status_code == 404  # no schema or docs pages to browse


def test_body_and_prompt_size_caps(hardened):
    client, _ = hardened
    big = json.dumps({"model": "base", "prompt": "x" * 5000}).encode()
    declared = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    chunked = client.post("/v1/completions", content=iter([big[:3000], big[3000:]]),  # no Content-Length
                          headers={"content-type": "application/json"})
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert "limit of 4096 bytes (tuneoff serve --max-body-bytes)" in response.json()["error"]["message"]
    for path, body in (("/v1/completions", {"model": "base", "prompt": ["x" * 600, "y" * 600]}),
                       ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x" * 1500}]})):
        response = client.post(path, json=body)
        assert response.status_code == 400, response.text
        assert "over this server's limit of 1000 (tuneoff serve --max-prompt-chars)" in response.json()["error"]["message"]
    assert client.get("/health").json()["status"] == "ok"


def test_a_full_queue_part_way_withdraws_the_requests_queued_prompts(hardened):
    client, _ = hardened
    before = client.get("/stats").json()["requests"]["completed"]
    full = client.post("/v1/completions", json={"model": "base", "prompt": ["one", "two", "three"], "max_tokens": 4})
    assert full.status_code == 503, full.text  # the queue holds 2
    assert reply(client, "base")  # queued after "one" and "two": they would have run first
    assert client.get("/stats").json()["requests"]["completed"] == before + 1


def test_errors_inside_requests_are_generic_500s_and_streams_still_end(hardened, adapters):
    client, log = hardened

    def poison(config, tensors):
        for key in [k for k in tensors if "lora_B" in k]:
            tensors[key] = torch.full_like(tensors[key], float("nan"))

    nan = copy_adapter(adapters, "alpha", "nan_b", poison)  # NaN logits: sampling fails in torch.multinomial
    assert client.post("/admin/adapters", json={"name": "nan", "path": nan}, headers=admin()).status_code == 201
    failed = chat(client, "nan", temperature=1.0)
    assert failed.status_code == 500
    message = failed.json()["error"]["message"]
    assert message.startswith("internal error (id ") and "probability" not in message
    assert re.search(r"id (\w+)", message).group(1) in log.read_text() and "probability tensor" in log.read_text()

    with client.stream("POST", "/v1/chat/completions", json={"model": "nan", "messages": PROMPT, "max_tokens": 12,
                                                              "temperature": 1.0, "stream": True}) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"  # the failure came mid-stream
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"].startswith("internal error (id ")

    # an adapter whose folder breaks after it was checked: the 500 does not name the folder
    gone = copy_adapter(adapters, "alpha", "gone", lambda config, tensors: None)
    assert client.post("/admin/adapters", json={"name": "gone", "path": gone}, headers=admin()).status_code == 201
    assert chat(client, "nan").status_code == 200  # room for one adapter: gone is unloaded
    (adapters / gone / "adapter_model.safetensors").write_bytes(b"")
    failed = chat(client, "gone")
    assert failed.status_code == 500 and str(adapters) not in failed.text, failed.text
    assert f"{adapters / gone}" in log.read_text()


# -- without a server: the registry, the admin switch, start-up errors --------------------------

def test_registry_serves_adapters_and_refuses_full_models(tmp_path, adapters):
    project = tmp_path / "project"
    for task, method in (("extraction", "lora"), ("iso_codes", "qlora"), ("tickets", "qlora")):
        shutil.copytree(adapters / "alpha", project / "runs" / task / method / "model")
    versions = {"models": {
        "extraction-model": [{"version": 1, "stage": "production", "method": "lora", "path": "runs/extraction/lora/merged",
                              "adapter": "runs/extraction/lora/model", "form": "float-merged", "base": "models/base"}],
        "iso_codes-model": [{"version": 1, "stage": "archived", "method": "full", "path": "runs/iso_codes/full/model"},
                            # registered before the "adapter" key existed: the adapter beside the merged folder
                            {"version": 2, "stage": "production", "method": "qlora", "path": "runs/iso_codes/qlora/merged"}],
        "banking77-model": [{"version": 1, "stage": "production", "method": "full", "path": "runs/banking77/full/model"}],
        # QLoRA deployed as it trained: its adapter needs the 4-bit base, not the float one served here
        "tickets-model": [{"version": 1, "stage": "production", "method": "qlora", "path": "runs/tickets/qlora/merged-nf4",
                           "adapter": "runs/tickets/qlora/model", "form": "nf4-merged", "base": "models/base-nf4"}],
    }}
    (project / "registry").mkdir()
    (project / "registry" / "registry.json").write_text(json.dumps(versions))
    served, refused = from_registry(project / "registry", "production", project / "models/base")
    assert [(name, path, method) for name, path, method, _ in served] == [
        ("extraction-model", project / "runs/extraction/lora/model", "lora"),
        ("iso_codes-model", project / "runs/iso_codes/qlora/model", "qlora")]
    assert list(refused) == ["banking77-model", "tickets-model"]
    assert "full fine-tune" in refused["banking77-model"]
    assert f"tuneoff serve --base {project / 'runs/banking77/full/model'}" in refused["banking77-model"]
    assert "deployed as nf4-merged on the base models/base-nf4" in refused["tickets-model"]
    assert f"tuneoff serve --base {project / 'models/base-nf4'}" in refused["tickets-model"]
    assert f"tuneoff serve --base {project / 'runs/tickets/qlora/merged-nf4'} --base-name tickets-model" in refused["tickets-model"]
    # on the 4-bit base it is the LoRA version, registered for the float base, that is refused
    served, refused = from_registry(project / "registry", "production", project / "models/base-nf4")
    assert [name for name, *_ in served] == ["iso_codes-model", "tickets-model"]
    assert list(refused) == ["extraction-model", "banking77-model"]


def test_in_process_app_refused_model_qlora_note_and_admin_off(tiny_base, adapters, monkeypatch):
    from fastapi.testclient import TestClient

    from tuneoff.serving.api import Limits, create_app
    from tuneoff.serving.engine import Engine
    from tuneoff.serving.model import MultiLoraModel

    model = MultiLoraModel(tiny_base, "base", torch.device("cpu"), torch.float32, max_resident=1, max_rank=64)
    model.refused["big-model"] = "a full fine-tune; serve it on its own"
    model.add(AdapterSpec("q", adapters / "alpha", "qlora", "test"))
    app = create_app(model, Engine(model, 4, 0.0, 8), Limits(16, 1 << 20, 10_000), [adapters], admin_token=None,
                     api_key=None)
    with TestClient(app) as client:
        refused = client.post("/v1/completions", json={"model": "big-model", "prompt": "hi"})
        assert refused.status_code == 404 and "a full fine-tune; serve it on its own" in refused.json()["error"]["message"]
        note = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == "q")["note"]
        assert note.startswith("trained on the 4-bit NF4 base, served on this float base")
        off = client.post("/admin/adapters", json={"name": "x", "path": "beta"}, headers=admin())
        assert off.status_code == 403 and "disabled" in off.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "q", "prompt": "hi", "max_tokens": 3}).status_code == 200


def test_serve_start_up_errors_are_one_line(tmp_path, adapters, capsys, monkeypatch):
    from tuneoff.cli import main

    monkeypatch.chdir(tmp_path)  # no ./registry here

    for argv, message in [
        (["--base", str(tmp_path / "nowhere")], "no config.json"),
        (["--adapter", "alpha"], "write it as NAME=PATH"),
        (["--adapter", f"a.b={adapters / 'alpha'}"], "adapter name 'a.b'"),
        (["--adapter", f"x={adapters / 'not_an_adapter'}"], "not a PEFT adapter folder"),
        (["--adapter", f"x={adapters / 'alpha'}", "--adapter", f"x={adapters / 'beta'}"], "given twice"),
        (["--registry", str(tmp_path)], "registry.json not found"),
        (["--max-adapters", "0"], "--max-adapters must be at least 1"),
        (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["serve", *argv])
        assert exit_.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_adapter_names_that_peft_cannot_hold_are_refused():
    assert check_name("extraction-lora", "base") == "extraction-lora"
    for name, why in (("half", "is a torch module attribute"), ("base", "is reserved"), ("a/b", "use 1-64 letters")):
        with pytest.raises(TuneoffError, match=why):
            check_name(name, "base")
