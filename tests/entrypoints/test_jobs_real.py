"""Batch jobs, the chat helper and the segment cache on disk with the real model (SmolLM2-135M):
`sparsex generate` end to end against the Python API, the OpenAI batch form against ours, and a
saved cache loaded by a fresh engine. Short prompts: the CPU runs these."""

import json

import numpy as np
import pytest

import sparsex_jax as sx
from sparsex_jax.entrypoints import cli

pytestmark = pytest.mark.slow

SYSTEM = "Answer with a short phrase taken from the passage."
PASSAGES = [
    "The Orvane Bridge crosses the river Tessel at Marlow. It was designed by the engineer Hedda "
    "Lindqvist and opened in 1902 after six years of work.",
    "Saltmere is a fishing town on the east coast. Its harbour was rebuilt in 1875 by the "
    "merchant Tobias Crane, and the town is known for its smoked herring.",
]
QUESTIONS = [("Who designed the Orvane Bridge?", "Who rebuilt the harbour of Saltmere?"),
             ("When did the Orvane Bridge open?", "What is Saltmere known for?")]
N_NEW = 6
POOL = 48 << 20  # 48 MiB: 66 pages of 16 tokens, plenty for these prompts; one pool shape


def _engine(real_model, **kw):
  cfg, params, tok = real_model
  return sx.Engine(cfg, params, tok, kv_pool_bytes=POOL, **kw)


def _messages(p, q):
  return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PASSAGES[p]},
          {"role": "user", "content": QUESTIONS[q][p]}]


def test_chat_segments_render_the_template_one_message_each(real_model):
  tok = real_model.tokenizer
  messages = _messages(0, 0)
  segs = sx.chat_segments(tok, messages)
  assert "".join(s.content for s in segs) == tok.apply_chat_template(messages)
  assert [s.cache for s in segs] == [True, True, True, False]  # the generation prompt: uncached
  assert segs[1].content == f"<|im_start|>user\n{PASSAGES[0]}<|im_end|>\n"
  # The passage is the same segment after another history: a segment-cache hit.
  other = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."},
           {"role": "user", "content": PASSAGES[0], "cache": True}]
  assert sx.chat_segments(tok, other)[2] == segs[1]
  assert sx.message_segments(tok, [messages[1]]) == [segs[1]]  # what to precompute
  assert not sx.chat_segments(tok, [dict(messages[1], cache=False)])[0].cache
  with pytest.raises(ValueError, match="message 0: unknown field"):
    sx.chat_segments(tok, [{"role": "user", "content": "x", "name": "y"}])


def test_generate_end_to_end_matches_the_python_api(real_model, tmp_path, monkeypatch, capsys):
  lines = []
  for q in range(2):
    for p in range(2):
      lines.append(json.dumps({"id": f"p{p}q{q}", "messages": _messages(p, q)}))
  lines.insert(2, '{"id": "oops", "messages": [')  # a malformed line in the middle: line 3
  lines.append(json.dumps({  # the OpenAI batch form of p0q0's prompt
      "custom_id": "openai-p0q0", "method": "POST", "url": "/v1/chat/completions",
      "body": {"model": "smollm2-135m", "messages": _messages(0, 0), "max_tokens": N_NEW,
               "temperature": 0}}))
  inp, out = tmp_path / "req.jsonl", tmp_path / "res.jsonl"
  inp.write_text("\n".join(lines) + "\n")
  monkeypatch.setattr(cli, "_build_engine", lambda args: _engine(real_model, max_batch_size=8))
  rc = cli.main(["generate", "--input", str(inp), "--output", str(out), "--max-new-tokens",
                 str(N_NEW), "--batch-size", "8", "--no-progress"])
  assert rc == 1  # a line failed
  err = capsys.readouterr().err
  assert f"{inp}:3: not valid JSON" in err
  results = [json.loads(line) for line in out.read_text().splitlines()]
  ours = {r["id"]: r for r in results if "custom_id" not in r}
  assert sorted(ours) == ["p0q0", "p0q1", "p1q0", "p1q1"]
  # Every request reused the system prompt and its passage (computed alone once, before them).
  for p in range(2):
    for q in range(2):
      stats = ours[f"p{p}q{q}"]["stats"]
      assert stats["n_reused"] > 30 and stats["n_new"] < 20, stats
  assert ours["p0q0"]["reuse"] == {"mode": "sparsex", "recompute_ratio": 0.15,
                                   "layer_threshold": 4}
  assert "cache hit rate" in err and "without reuse" in err

  # The OpenAI form gives the tokens of ours for the same prompt.
  theirs = next(r for r in results if r.get("custom_id") == "openai-p0q0")
  assert theirs["sparsex"]["token_ids"] == ours["p0q0"]["token_ids"]
  assert theirs["response"]["body"]["choices"][0]["message"]["content"] == ours["p0q0"]["text"]

  # The Python API, directly: the shared segments cached alone (the system prompt and both
  # passages; not p0q0's question: the OpenAI line repeats it as its final message, which is not
  # cached by default, so only p0q0 contributes it and the job never reuses it), then the same
  # requests.
  engine = _engine(real_model, max_batch_size=8)
  shared = sx.chat_segments(engine.tokenizer, _messages(0, 0))[:2] + \
      sx.chat_segments(engine.tokenizer, _messages(1, 0))[1:2]
  engine.cache_segments(shared)
  sp = sx.SamplingParams(max_new_tokens=N_NEW)
  reqs = [engine.chat_request(_messages(p, q), id=f"p{p}q{q}", sampling=sp)
          for q in range(2) for p in range(2)]
  for o in engine.generate(reqs, reuse=sx.ReuseConfig("sparsex")):
    assert o.token_ids == ours[o.request_id]["token_ids"], o.request_id
    assert o.stats.n_reused == ours[o.request_id]["stats"]["n_reused"]


def test_saved_cache_loaded_by_a_fresh_engine_gives_the_logits_of_recomputing(real_model,
                                                                               tmp_path):
  tok = real_model.tokenizer
  passage = sx.chat_segments(tok, _messages(1, 0))[1]
  request = sx.chat_request(tok, _messages(1, 1))
  reuse = sx.ReuseConfig("sparsex")
  first = _engine(real_model)
  first.use_cache_dir(tmp_path)
  first.cache_segments([passage])
  fresh = _engine(real_model)  # a new engine: its own pool and caches, only the disk in common
  fresh.use_cache_dir(tmp_path)
  got, plan = fresh.prefill_logits(request, reuse, return_plan=True)
  recompute = _engine(real_model)
  recompute.cache_segments([passage])
  want = recompute.prefill_logits(request, reuse)
  assert plan.reused_positions.size > 30
  np.testing.assert_array_equal(got, want)
  # A cache of another page size is refused, naming the index.
  with pytest.raises(sx.CacheError, match=r"index\.json.*page size 16 \(this engine: 32\)"):
    _engine(real_model, page_size=32).use_cache_dir(tmp_path)
