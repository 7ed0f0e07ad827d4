"""`sparsex serve` (sparsex_jax/entrypoints/serve/): the OpenAI-compatible server on a loopback port,
driven by the official `openai` client and httpx, over the tiny random model with a test tokenizer
(one token per byte in, one character per token out, so text and tokens map one to one).

Checked: the client's chat and completion calls, streaming and not, give Engine.generate's tokens
for the same request and seed; a second chat turn reports the tokens it reused (x_sparsex, the
x-sparsex-* headers) as the engine does, and another API key's namespace never reuses them; bad
requests get a 4xx naming the field and the server answers the next one; concurrent requests
with random cancellations are each whole and right, and afterwards every page is free or held by
a cache; /health, /v1/models, /metrics.
"""

import asyncio
import json
import random
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn

import sparsex_jax as sx
from sparsex_jax.entrypoints.serve.app import Server, ServeConfig
from tests.engine.test_engine import CFG, _engine
from tests.research.scripts import CHEAP_XLA_FLAGS

MODEL = "tiny-test"


class CharTokenizer:
  """Bytes in (ids 3..258), one character per id out; a plain chat template; no stop ids."""

  stop_ids = ()

  def encode(self, text, add_special_tokens=False):
    return [b + 3 for b in text.encode()]

  def decode(self, ids, skip_special_tokens=True):
    return "".join(chr(0x4E00 + int(i)) for i in ids)

  def apply_chat_template(self, messages, add_generation_prompt=False):
    text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")


TOK = CharTokenizer()


def _text(tokens):
  return TOK.decode(tokens)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
  engine = _engine(tokenizer=TOK, num_pages=512, max_batch_size=8)
  yield from serving(engine, ServeConfig(MODEL, sx.ReuseConfig("sparsex"), default_max_tokens=8,
                                         max_waiting=64, namespace_per_key=True))


def serving(engine, config):
  """A Server for `engine` on a free loopback port, in a thread (a fixture's body)."""
  srv = Server(engine, config)
  port = _free_port()
  uv = uvicorn.Server(uvicorn.Config(srv.app(), host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not uv.started:
    assert time.time() < deadline and thread.is_alive(), "the server did not start"
    time.sleep(0.02)
  srv.url = f"http://127.0.0.1:{port}"
  yield srv
  uv.should_exit = True
  thread.join(30)


def _metrics(server) -> dict[str, float]:
  text = httpx.get(server.url + "/metrics").text
  return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
          if line and not line.startswith("#")}


def _wait_healthy(proc, url, timeout):
  """Until a `sparsex serve` subprocess answers /health (fails if it exits first)."""
  deadline = time.time() + timeout
  while True:
    assert proc.poll() is None, proc.stderr.read()
    try:
      if httpx.get(url + "/health").status_code == 200:
        return
    except httpx.TransportError:
      pass
    assert time.time() < deadline, "the server did not start"
    time.sleep(0.1)


def _client(server, key="key-a"):
  return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _reference(requests, reuse="sparsex"):
  """Engine.generate on a fresh engine (no caches) of the same weights."""
  eng = _engine(tokenizer=TOK, num_pages=512)
  return eng.generate(requests, reuse=sx.ReuseConfig(reuse))


def _chat(messages, **sampling):
  return sx.chat_request(TOK, messages, sampling=sx.SamplingParams(**sampling))


def _conversation():
  """A passage cached by an earlier request, a turn that reuses it at a new position, and the
  next turn of that conversation: (earlier, turn1, turn2) messages and the engine's outputs of
  the two turns (a fresh engine of the same weights)."""
  passage = {"role": "user", "content": "Passage: the keeper logged storms and ships. " * 3}
  earlier = [{"role": "system", "content": "Be brief."}, passage]
  turn1 = [{"role": "system", "content": "You answer in one word, always."}, passage]
  ref = _engine(tokenizer=TOK, num_pages=512)
  ref.generate([_chat(earlier, max_new_tokens=3)])
  want1 = ref.generate([_chat(turn1, max_new_tokens=4)])[0]
  turn2 = turn1 + [{"role": "assistant", "content": want1.text},
                   {"role": "user", "content": "Why?"}]
  want2 = ref.generate([_chat(turn2, max_new_tokens=4)])[0]
  return earlier, turn1, turn2, want1, want2


def _wait_idle(server, timeout=30):
  deadline = time.time() + timeout
  while server.loop.pending:
    assert time.time() < deadline, f"{server.loop.pending} requests still pending"
    time.sleep(0.02)
  time.sleep(0.2)  # the engine thread back at its queue


def test_openai_client_chat_and_completions_match_engine_generate(server):
  client = _client(server)
  messages = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Name three colours."}]
  prompt = [int(t) for t in np.random.default_rng(7).integers(3, CFG.vocab_size, 23)]
  want_chat, want_sampled, want_cmpl = _reference([
      _chat(messages, max_new_tokens=6),
      _chat(messages, max_new_tokens=6, temperature=0.9, top_p=0.8, seed=11),
      sx.Request([sx.Segment(prompt)], sampling=sx.SamplingParams(max_new_tokens=7, seed=3))])
  r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                     temperature=0)
  assert r.choices[0].message.content == _text(want_chat.token_ids)
  assert r.choices[0].finish_reason == "length"
  assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == want_chat.stats.n_prompt
  assert r.model_extra["x_sparsex"]["token_ids"] == want_chat.token_ids
  r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                     temperature=0.9, top_p=0.8, seed=11)
  assert r.choices[0].message.content == _text(want_sampled.token_ids)
  chunks = list(client.chat.completions.create(
      model=MODEL, messages=messages, max_tokens=6, temperature=0.9, top_p=0.8, seed=11,
      stream=True, stream_options={"include_usage": True}))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == _text(want_sampled.token_ids)
  assert chunks[-1].usage.completion_tokens == 6
  r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0)
  assert r.choices[0].text == _text(want_cmpl.token_ids)
  chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=7,
                                          temperature=0, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == _text(want_cmpl.token_ids)
  assert chunks[-1].choices[0].finish_reason == "length"
  # a stop string ends the text before it, and the request with it
  stop = _text(want_cmpl.token_ids[3:5])
  r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0,
                                stop=[stop])
  assert r.choices[0].finish_reason == "stop"
  assert r.choices[0].text == _text(want_cmpl.token_ids)[:_text(want_cmpl.token_ids).find(stop)]


def test_second_turn_reuses_the_first_and_another_namespace_does_not(server):
  turn1 = [{"role": "system", "content": "You answer questions about the passage."},
           {"role": "user", "content": "Passage: the lighthouse keeper counted ships. " * 3}]
  ref = _engine(tokenizer=TOK, num_pages=512)
  first = ref.generate([_chat(turn1, max_new_tokens=5)])[0]
  turn2 = turn1 + [{"role": "assistant", "content": first.text},
                   {"role": "user", "content": "How many ships?"}]
  # the first-token logits of turn 2 with turn 1 cached (another engine at the same state)
  at_turn2 = _engine(tokenizer=TOK, num_pages=512)
  at_turn2.generate([_chat(turn1, max_new_tokens=5)])
  want_logits, want_plan = at_turn2.prefill_logits(_chat(turn2, max_new_tokens=5),
                                                   sx.ReuseConfig("sparsex"), return_plan=True)
  want = ref.generate([_chat(turn2, max_new_tokens=5)])[0]
  assert want.stats.n_reused + want.stats.n_exact > 0
  assert want.stats.n_recomputed == want_plan.selected_positions.size

  client = _client(server, "key-a")
  r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=5, temperature=0)
  assert r1.choices[0].message.content == first.text
  seen = {}
  server.loop.on_first_logits = lambda handle, logits: seen.setdefault(handle.request_id, logits)
  try:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=turn2,
                                                           max_tokens=5, temperature=0)
  finally:
    server.loop.on_first_logits = None
  r2 = raw.parse()
  [got_logits] = seen.values()
  assert got_logits.shape == want_logits.shape
  # the served prefill's logits are the engine's with the same reuse and cache state
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5 * np.abs(
      want_logits).max())
  x = r2.model_extra["x_sparsex"]
  assert x["token_ids"] == want.token_ids  # the engine's tokens with the same reuse
  assert (x["reused_tokens"], x["exact_tokens"], x["recomputed_tokens"]) == (
      want.stats.n_reused, want.stats.n_exact, want.stats.n_recomputed)
  assert raw.headers["x-sparsex-reused-tokens"] == str(want.stats.n_reused)
  assert raw.headers["x-sparsex-reuse"] == "sparsex"
  # the same conversation under another API key: its own namespace, nothing reused
  other = _client(server, "key-b").chat.completions.create(model=MODEL, messages=turn2,
                                                          max_tokens=5, temperature=0)
  x = other.model_extra["x_sparsex"]
  assert x["reused_tokens"] == 0 and x["exact_tokens"] == 0
  # a request may choose its reuse method ("reuse", an extra_body field)
  full = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=5,
                                        temperature=0, extra_body={"reuse": "full"})
  assert full.model_extra["x_sparsex"]["reuse"] == "full"
  assert full.model_extra["x_sparsex"]["reused_tokens"] == 0


def test_a_conversation_continues_its_reused_history_as_the_engine_does(server):
  """A turn whose passage was reused at a new position is approximate after it; the next turn
  starts with that whole prompt, so it continues its K/V (x_sparsex.continued_tokens) instead of
  reusing the passage again, and gives the engine's tokens for the same calls."""
  earlier, turn1, turn2, want1, want2 = _conversation()
  assert want1.stats.n_reused > 0 and want2.stats.n_continued > 0 and want2.stats.n_reused == 0

  client = _client(server, "key-continue")
  client.chat.completions.create(model=MODEL, messages=earlier, max_tokens=3, temperature=0)
  r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=4, temperature=0)
  assert r1.model_extra["x_sparsex"]["token_ids"] == want1.token_ids
  raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=turn2,
                                                         max_tokens=4, temperature=0)
  x = raw.parse().model_extra["x_sparsex"]
  assert x["token_ids"] == want2.token_ids
  assert (x["continued_tokens"], x["exact_tokens"], x["reused_tokens"]) == (
      want2.stats.n_continued, want2.stats.n_exact, 0)
  assert raw.headers["x-sparsex-continued-tokens"] == str(want2.stats.n_continued)


def test_each_request_is_prefilled_alone_and_gets_its_first_token_before_the_decode_loop(
    server, monkeypatch):
  """Concurrent requests: every prefill program the server ran has one row (a server's programs
  depend on one request's shape buckets, not on the mix), each answer is what Engine.generate
  gives the request alone, and when a decode loop starts every running client already has its
  first token."""
  from sparsex_jax import decoding
  late = []
  visit = decoding.visit

  def checked_visit(pool, params, cfg, batch, **kw):
    for seq in batch.running():
      handle = server.loop._handles.get(seq.key.index)
      if handle is not None and handle.sent == 0:
        late.append(handle.request_id)
    return visit(pool, params, cfg, batch, **kw)

  monkeypatch.setattr(decoding, "visit", checked_visit)
  prompts = [[int(t) for t in np.random.default_rng(i).integers(3, 400, 20 + 9 * i)]
             for i in range(4)]
  want = _reference([sx.Request([sx.Segment(p)], sampling=sx.SamplingParams(max_new_tokens=6))
                     for p in prompts])
  seen = set(server.engine.kv.log._seen)
  client = _client(server, "key-alone")

  def complete(p):
    return client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
  threads, got = [], {}
  for i, p in enumerate(prompts):
    threads.append(threading.Thread(target=lambda i=i, p=p: got.__setitem__(i, complete(p))))
    threads[-1].start()
  for t in threads:
    t.join(60)
  assert [got[i].model_extra["x_sparsex"]["token_ids"] for i in range(4)] == \
      [o.token_ids for o in want]
  ran = [shapes for name, _, _, shapes in set(server.engine.kv.log._seen) - seen
         if name == "prefill"]
  # the batch's [rows, tokens] int32 arrays (tokens, positions, slots, ...) have one row
  assert ran and {shape[0] for shapes in ran for shape, dtype in shapes
                  if dtype == "int32" and len(shape) == 2} == {1}
  assert not late, f"decode loops ran before {late} had their first token"


@pytest.mark.parametrize("body, status, field", [
    ("{not json", 400, None),
    ({"model": "gpt-4", "prompt": [5, 6]}, 404, "model"),
    ({"model": MODEL, "prompt": [5, 6], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [5] * (CFG.max_seq_len + 1)}, 400, "prompt"),
    ({"model": MODEL, "prompt": [5] * 1000, "max_tokens": 100}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [5, 6], "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": [5, 6], "logprobs": 3}, 400, "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": MODEL, "prompt": [5, 6], "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": [5, 6], "reuse": {"mode": "sparsex", "colour": 1}}, 400, "reuse"),
    ({"model": MODEL, "prompt": [CFG.vocab_size]}, 400, "prompt"),
])
def test_bad_requests_get_4xx_naming_the_field_and_the_next_request_runs(server, body, status,
                                                                         field):
  url = server.url + ("/v1/chat/completions" if isinstance(body, dict) and "messages" in body
                      else "/v1/completions")
  data = body if isinstance(body, str) else json.dumps(body)
  r = httpx.post(url, content=data, headers={"Authorization": "Bearer key-a",
                                             "Content-Type": "application/json"}, timeout=60)
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert err["param"] == field
  if field is not None:
    assert field in err["message"]
  ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [7, 8, 9],
                                                          "max_tokens": 2},
                  headers={"Authorization": "Bearer key-a"}, timeout=60)
  assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_namespace_per_key_server_refuses_requests_without_a_key(server):
  r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [7, 8]})
  assert r.status_code == 401


def test_concurrent_requests_with_cancellations_are_whole_and_leave_no_page_held(server):
  rng = np.random.default_rng(5)
  system = [int(t) for t in rng.integers(3, CFG.vocab_size, 9)]
  prompts = [system + [int(t) for t in rng.integers(3, CFG.vocab_size, int(rng.integers(3, 30)))]
             for _ in range(50)]
  want = _reference([sx.Request([sx.Segment(p)], sampling=sx.SamplingParams(max_new_tokens=12, temperature=0.7,
                                                                             seed=i))
                     for i, p in enumerate(prompts)], reuse="full")
  chooser = random.Random(0)
  plan = [chooser.choice(["whole", "whole", "stream", "cancel-stream", "cancel"])
          for _ in prompts]

  async def one(client, i):
    body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 12, "temperature": 0.7,
            "seed": i, "reuse": "full"}
    if plan[i] == "whole":
      r = await client.post("/v1/completions", json=body)
      assert r.status_code == 200, r.text
      return r.json()["x_sparsex"]["token_ids"]
    if plan[i] == "cancel":  # the client gives up before the answer: a disconnect
      with pytest.raises(httpx.TimeoutException):
        await client.post("/v1/completions", json=body, timeout=0.05)
      return None
    async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
      text = ""
      async for line in r.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
          continue
        chunk = json.loads(line[6:])
        text += chunk["choices"][0]["text"]
        if plan[i] == "cancel-stream" and text:
          return None  # closes the stream mid-way
        if "x_sparsex" in chunk:
          assert _text(chunk["x_sparsex"]["token_ids"]) == text
          return chunk["x_sparsex"]["token_ids"]
    raise AssertionError("the stream ended without its last chunk")

  async def main():
    async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                 headers={"Authorization": "Bearer key-c"}) as client:
      return await asyncio.gather(*(one(client, i) for i in range(len(prompts))))

  got = asyncio.run(main())
  for i, tokens in enumerate(got):
    if tokens is not None:
      assert tokens == want[i].token_ids, i
  assert sum(t is not None for t in got) >= 20
  _wait_idle(server)
  store = server.engine.store
  store.check_invariants()
  assert not store._live  # no lease left: every page is free or held by a cache
  assert server.engine.stats()["pool"]["pages_used"] == store.num_cached_pages


def test_health_models_and_metrics(server):
  assert httpx.get(server.url + "/health").json() == {"status": "ok"}
  models = _client(server).models.list()
  assert [m.id for m in models.data] == [MODEL]
  r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [31, 32],
                                                        "max_tokens": 3},
                 headers={"Authorization": "Bearer key-a"}, timeout=60)
  assert r.status_code == 200
  text = httpx.get(server.url + "/metrics").text
  values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line and not line.startswith("#")}
  assert values["sparsex_time_to_first_token_seconds_count"] >= 1
  assert values["sparsex_time_per_output_token_seconds_count"] >= 1
  assert values["sparsex_generation_tokens_total"] >= 3
  assert values['sparsex_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
  assert values["sparsex_pool_pages_capacity"] == server.engine.layout.num_pages - 1
  # the server compiled its programs while serving: each compiling step is counted, with its time
  assert values["sparsex_compiled_programs"] == server.engine.num_compilations >= 2
  assert 1 <= values["sparsex_compiling_steps_total"] <= values["sparsex_compiled_programs"]
  assert values["sparsex_compile_stall_seconds_total"] > 0
  # the answer's first 2 tokens fill the prompt's page (4 tokens): cached for a next turn
  assert values["sparsex_output_tokens_cached_total"] >= 2
  for name in ("sparsex_requests_total", "sparsex_time_to_first_token_seconds_bucket",
               "sparsex_time_per_output_token_seconds_bucket", "sparsex_requests_running",
               "sparsex_requests_waiting", "sparsex_pool_pages_used",
               "sparsex_segment_cache_hit_rate", "sparsex_prefix_cache_hit_rate",
               "sparsex_recomputed_tokens_total", "sparsex_reused_tokens_total"):
    assert name in text, name


def test_a_full_queue_gets_429_with_retry_after_and_a_timeout_504(server):
  headers = {"Authorization": "Bearer key-a"}
  body = {"model": MODEL, "prompt": [7, 8, 9], "max_tokens": 2}
  capacity = server.loop.capacity
  server.loop.capacity = 0  # as if rows and queue were taken
  try:
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
  finally:
    server.loop.capacity = capacity
  assert r.status_code == 429 and r.headers["retry-after"] == "1"
  assert "too many requests" in r.json()["error"]["message"]
  server.config.request_timeout = 1e-4
  try:
    r = httpx.post(server.url + "/v1/completions", json=body | {"max_tokens": 50}, timeout=60,
                   headers=headers)
  finally:
    server.config.request_timeout = None
  assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
  _wait_idle(server)  # the timed-out request was cancelled in the engine
  assert not server.engine.store._live
  # the schedulers keep nothing of the requests the server has answered (bounded memory)
  assert all(not g.scheduler.finished and not g.scheduler.failed
             for g in server.loop._groups.values())
  assert httpx.post(server.url + "/v1/completions", json=body, headers=headers,
                    timeout=60).status_code == 200


def test_sigterm_during_a_stream_finishes_it_exits_0_and_the_cache_dir_verifies(tmp_path):
  import os
  import signal
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  port, cache = _free_port(), str(tmp_path / "cache")
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", XLA_FLAGS=CHEAP_XLA_FLAGS)
  proc = subprocess.Popen(
      [sys.executable, "-m", "sparsex_jax.entrypoints.cli", "serve", "--model", "random:tiny",
       "--port", str(port), "--page-size", "4", "--pool-gib", "0.002", "--batch-size", "2",
       "--cache-dir", cache], env=env, stderr=subprocess.PIPE, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(proc, url, 60)
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, CFG.vocab_size, 40)]
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": "random:tiny", "prompt": prompt, "max_tokens": 300,
                            "temperature": 0, "stream": True}) as r:
      for line in r.iter_lines():
        if line.startswith("data: "):
          chunks.append(line[6:])
          if len(chunks) == 2:
            proc.send_signal(signal.SIGTERM)
    assert chunks[-1] == "[DONE]"
    last = json.loads(chunks[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert len(last["x_sparsex"]["token_ids"]) == 300  # the stream ran to its end
    assert proc.wait(60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
  info = subprocess.run([sys.executable, "-m", "sparsex_jax.entrypoints.cli", "cache", "info",
                         cache, "--verify", "--json"], env=env, capture_output=True, text=True)
  assert info.returncode == 0, info.stderr
  assert json.loads(info.stdout)["segments"] == 1  # the prompt, saved at shutdown


def test_a_failing_prefill_is_that_request_s_error_and_the_server_keeps_serving(server,
                                                                                monkeypatch):
  from sparsex_jax import step_runner
  poison = 499
  real = step_runner.prefill_and_commit

  def flaky(engine, prompts, leases, policy):
    if any(poison in p.token_ids for p in prompts):
      raise RuntimeError("device failure (injected)")
    return real(engine, prompts, leases, policy)

  monkeypatch.setattr(step_runner, "prefill_and_commit", flaky)
  headers = {"Authorization": "Bearer key-d"}

  async def main():
    async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=headers) as client:
      return await asyncio.gather(*(
          client.post("/v1/completions", json={"model": MODEL, "max_tokens": 3,
                                               "prompt": [11 + i, 12, poison if i == 2 else 13]})
          for i in range(4)))

  answers = asyncio.run(main())
  assert [r.status_code for r in answers] == [200, 200, 500, 200]
  assert "device failure (injected)" in answers[2].json()["error"]["message"]
  _wait_idle(server)
  assert not server.engine.store._live


def test_a_client_that_goes_away_cancels_its_request_in_the_engine(server):
  headers = {"Authorization": "Bearer key-e"}
  body = {"model": MODEL, "prompt": [21, 22, 23], "max_tokens": 1000, "temperature": 0}
  finished = server.metrics.generation_tokens._value.get()
  with httpx.stream("POST", server.url + "/v1/completions", json=body | {"stream": True},
                    headers=headers, timeout=60) as r:
    for line in r.iter_lines():
      if line.startswith("data: "):
        break  # the first chunk: the request is running; the client leaves
  with pytest.raises(httpx.TimeoutException):  # a non-streaming client that gives up
    httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=0.5)
  _wait_idle(server, timeout=20)
  # neither ran to its 1000 tokens: both were taken out of the engine, their pages given back
  assert server.metrics.generation_tokens._value.get() == finished
  assert not server.engine.store._live


def test_mixed_reuse_methods_under_pool_pressure_wait_for_pages_and_all_complete():
  """Requests overriding the server's reuse method run beside its own over one small pool: a
  request that finds no pages waits for the running ones (of any method) instead of failing."""
  engine = _engine(tokenizer=TOK, num_pages=40, max_batch_size=4)
  rng = np.random.default_rng(17)
  methods = ["sparsex", "full", "sparsex", "sparsex", "full", "sparsex", "full", "sparsex"]
  prompts = [[int(t) for t in rng.integers(3, CFG.vocab_size, 24)] for _ in methods]
  max_new = 40  # more than a decode loop's steps: requests stay running across rounds
  pages = sum(engine.layout.pages_for(len(p) + max_new) for p in prompts)
  assert pages > 2 * (engine.layout.num_pages - 1)  # far from all at once
  want = {}
  for method in set(methods):
    idx = [i for i, m in enumerate(methods) if m == method]
    outs = _reference([sx.Request([sx.Segment(prompts[i])],
                                  sampling=sx.SamplingParams(max_new_tokens=max_new,
                                                             temperature=0.8, seed=i))
                       for i in idx], reuse=method)
    want |= {i: o.token_ids for i, o in zip(idx, outs)}

  for server in serving(engine, ServeConfig(MODEL, sx.ReuseConfig("sparsex"), max_waiting=64)):
    async def one(client, i):
      body = {"model": MODEL, "prompt": prompts[i], "max_tokens": max_new, "temperature": 0.8,
              "seed": i}
      if methods[i] != "sparsex":
        body["reuse"] = methods[i]
      r = await client.post("/v1/completions", json=body)
      assert r.status_code == 200, r.text  # never a 500: it waited for pages
      x = r.json()["x_sparsex"]
      assert x["reuse"] == methods[i]
      return x["token_ids"]

    async def main():
      async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        return await asyncio.gather(*(one(client, i) for i in range(len(methods))))

    got = asyncio.run(main())
    assert got == [want[i] for i in range(len(methods))]
    assert len(server.loop._groups) == 2  # two batches shared the pool
    _wait_idle(server)
    store = engine.store
    store.check_invariants()
    assert not store._live  # every page is free or held by a cache
    assert engine.stats()["pool"]["pages_used"] == store.num_cached_pages


def test_tp2_server_on_two_fake_devices_answers_a_chat_as_the_unsharded_engine():
  """`sparsex serve --tp 2` in a process with two fake CPU devices: a chat completion (the
  synthetic byte tokenizer of random:PRESET) gives the tokens of Engine.generate at tp 1."""
  import os
  import subprocess
  import sys
  from models import llama
  from models.config import get_config
  from models.tokenizer import ByteTokenizer
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 " + CHEAP_XLA_FLAGS)
  proc = subprocess.Popen(
      [sys.executable, "-m", "sparsex_jax.entrypoints.cli", "serve", "--model", "random:tiny",
       "--tokenizer", "bytes", "--tp", "2", "--port", str(port), "--page-size", "4",
       "--pool-gib", "0.002", "--batch-size", "2"], env=env, stderr=subprocess.PIPE, text=True)
  messages = [{"role": "system", "content": "Sharded answers."},
              {"role": "user", "content": "Count the ships in the harbour, twice."}]
  cfg = get_config("tiny")
  tok = ByteTokenizer(cfg.vocab_size)
  engine = sx.Engine(cfg, llama.init_params(cfg, 0), tok, page_size=4, num_pages=128)
  want = engine.generate([sx.chat_request(tok, messages, sampling=sx.SamplingParams(
      max_new_tokens=12, temperature=0.9, seed=4))])[0]
  try:
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(proc, url, 90)
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="random:tiny", messages=messages, max_tokens=12,
                                       temperature=0.9, seed=4)
    assert r.model_extra["x_sparsex"]["token_ids"] == want.token_ids
    assert r.choices[0].message.content == tok.decode(want.token_ids)
  finally:
    proc.terminate()
    proc.wait(60)


def test_serve_refuses_a_steps_per_visit_below_one_before_building_anything():
  import argparse
  from sparsex_jax.entrypoints import cli
  from sparsex_jax.entrypoints.serve import server as serve_server
  p = argparse.ArgumentParser()
  serve_server.add_arguments(p, cli._add_engine_args)
  args = p.parse_args(["--model", "random:tiny", "--steps-per-visit", "0"])
  assert p.parse_args(["--model", "random:tiny"]).steps_per_visit == 8
  built = []
  with pytest.raises(ValueError, match="--steps-per-visit must be >= 1, got 0"):
    serve_server.run(args, lambda a: built.append(a))
  assert not built


def test_a_new_prefill_program_compiles_on_its_own_thread_while_the_running_requests_decode(
    server, monkeypatch):
  """The request at the head of the queue waits (lease given back) while its prefill program
  compiles on the compile thread; the running request goes on decoding meanwhile, and the
  waiting one then runs without compiling on the engine loop."""
  kv, go = server.engine.kv, threading.Event()
  compile_later = kv.compile_later

  def held(*args, **static):
    compile_now = compile_later(*args, **static)
    return lambda: (go.wait(60), compile_now())[1]

  monkeypatch.setattr(kv, "compile_later", held)
  client = _client(server, "key-ahead")
  full = {"reuse": "full"}
  running = [int(t) for t in np.random.default_rng(5).integers(3, 400, 40)]
  go.set()  # the running request's program compiles freely
  client.completions.create(model=MODEL, prompt=running, max_tokens=80, temperature=0,
                            extra_body=full)  # the same buckets (pages too) as below
  _wait_idle(server)
  go.clear()
  waiting = [int(t) for t in np.random.default_rng(6).integers(3, 400, 500)]  # a new bucket
  want = _reference([sx.Request([sx.Segment(waiting)], sampling=sx.SamplingParams(
      max_new_tokens=2))], reuse="full")[0]
  stalls, deferred = server.loop.compiling_steps, server.loop.admissions_deferred
  got = {}
  stream = client.completions.create(model=MODEL, prompt=running, max_tokens=80,
                                     temperature=0, extra_body=full, stream=True)
  chunks = iter(stream)
  next(chunks)  # the running request has its first token
  later = threading.Thread(target=lambda: got.setdefault("r", client.completions.create(
      model=MODEL, prompt=waiting, max_tokens=2, temperature=0, extra_body=full)))
  later.start()
  deadline = time.time() + 30
  while server.loop.admissions_deferred == deferred:  # it arrived, and waits for its program
    assert time.time() < deadline, "the request was never deferred"
    time.sleep(0.01)
  n_after = sum(1 for _ in chunks)  # the running request decodes to its end meanwhile
  assert n_after > 0 and later.is_alive()
  go.set()
  later.join(60)
  assert got["r"].model_extra["x_sparsex"]["token_ids"] == want.token_ids
  assert server.loop.compiling_steps == stalls  # nothing compiled on the engine loop


def test_a_conversation_continues_its_history_from_the_host_tier_as_from_the_pool():
  """With a host tier, a conversation whose history the pool evicted between its turns continues
  it from host memory: the next turn gives the tokens and the continued count of an engine that
  kept the history in the pool, and /metrics counts the tokens copied back. The server compiles
  its slot-copy and host-tier programs from its start, before any request
  (`sparsex_programs_to_compile_ahead` falls to 0), so that the turn which evicts and loads
  compiles nothing on the engine loop."""
  earlier, turn1, turn2, want1, want2 = _conversation()
  assert want2.stats.n_continued > 0

  engine = _engine(tokenizer=TOK, num_pages=512, max_batch_size=8, host_cache_bytes=1 << 24)
  for server in serving(engine, ServeConfig(MODEL, sx.ReuseConfig("sparsex"),
                                            default_max_tokens=8)):
    deadline = time.time() + 300
    while True:
      values = _metrics(server)
      if values["sparsex_programs_to_compile_ahead"] == 0:
        break
      assert time.time() < deadline, "the compile thread did not finish"
      time.sleep(0.2)
    # every copy width and host-tier program, with no request yet (some coincide on the CPU)
    assert values["sparsex_programs_compiled_ahead_total"] > 7 + 28
    client = _client(server)
    client.chat.completions.create(model=MODEL, messages=earlier, max_tokens=3, temperature=0)
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=4,
                                        temperature=0)
    assert r1.model_extra["x_sparsex"]["token_ids"] == want1.token_ids
    _wait_idle(server)
    engine.store.continuation_cache.evict(10**6)  # between the turns, the pool lets it go
    assert engine.host_tier.stats()["continuation_blocks"] > 0
    stalls = server.loop.compiling_steps
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=4,
                                        temperature=0)
    assert server.loop.compiling_steps == stalls  # the eviction's and the load's programs too
    x = r2.model_extra["x_sparsex"]
    assert x["token_ids"] == want2.token_ids
    assert (x["continued_tokens"], x["reused_tokens"]) == (want2.stats.n_continued, 0)
    values = _metrics(server)
    assert values["sparsex_host_tier_continued_tokens_total"] > 0
    assert values["sparsex_host_tier_bytes_used"] > 0
    _wait_idle(server)
    engine.store.check_invariants()
    assert engine.stats()["pool"]["pages_used"] == engine.store.num_cached_pages
