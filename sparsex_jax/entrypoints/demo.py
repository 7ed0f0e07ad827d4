"""`sparsex demo`: what segment reuse buys, on CPU, with the embedded default model.

A long passage is read once (first turn, full prefill; its KV lands in the segment cache). A second
turn puts the same passage after another system prompt, so it sits at other positions after other
context: the prefix cache cannot help, segment reuse can. The second turn runs with full prefill,
naive reuse and SparseX, each timed after a warm-up run (compilation is excluded), and each shown
with its answer and the first-token KL divergence from full prefill.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

# An invented history (so the model cannot know the answers beforehand), about 1,300 tokens.
PASSAGE = """\
The Lighthouse of Varnholm stands on a granite skerry two kilometres north of the harbour of \
Varnholm, a small port on the western coast. Before the lighthouse was built, ships approaching \
the harbour at night relied on a bonfire that the harbour master lit on the headland, and the \
parish records list eleven wrecks on the skerry between 1840 and 1880. After the loss of the \
grain ship Aurelia in the winter of 1881, in which nineteen sailors drowned, the town council \
petitioned the Maritime Board for a proper light.

Construction began in the spring of 1885 under the supervision of the engineer Matthias Brede, \
who had built two smaller lights further south. The granite for the tower was quarried on the \
skerry itself, which saved the cost of shipping stone from the mainland, but the iron lantern \
room was cast in a foundry in Kessel and brought out by barge. Work stopped twice: once in 1886, \
when a storm destroyed the wooden scaffolding, and once in 1887, when the contractor went \
bankrupt. The tower was finally completed in 1887 and first lit on the ninth of November of that \
year. It is twenty-six metres tall, with a spiral staircase of one hundred and twelve steps.

The first keeper was Anders Holm, a former sailor who served from 1887 until his death in 1894. \
He was followed by his daughter, Ingrid Sol, who kept the light for forty years, from 1894 to \
1934. Ingrid Sol is remembered above all for her logbook: every night she recorded the weather, \
the wind direction, the ships that passed and the hours the lamp burned, and after every storm \
she wrote a detailed account of the damage to the tower and the boats in the harbour. Her \
logbook, in nine leather volumes, is the most complete weather record of the coast for that \
period and is still consulted by historians of climate.

The original lamp burned paraffin and had to be wound by hand every four hours. In 1912 the \
paraffin lamp was fitted with a new Fresnel lens made in Paris, which doubled the range of the \
light to twenty-two nautical miles. The lamp was converted from paraffin to electricity in 1931, \
when a cable was laid across the seabed from the mainland; the keeper no longer had to climb the \
tower during the night, although Ingrid Sol continued to do so out of habit until she retired.

During the Second World War the light was dimmed for four years, and a small garrison of six \
soldiers lived in the keeper's house. A fire in the lantern room in 1947 damaged the lens, which \
was repaired by the same Paris workshop that had made it. The last resident keeper, Olav Strand, \
left the skerry in 1968, when the light was automated and connected to the harbour office by \
radio.

Today the keeper's house is a small museum about coastal shipping, run by the Varnholm Heritage \
Society. It is open from May to September, and a ferry leaves the harbour for the skerry three \
times a day in the summer. The museum displays the original paraffin lamp, a copy of Ingrid \
Sol's logbook, photographs of the wrecks, and a model of the grain ship Aurelia. Every year on \
the ninth of November the society lights candles at the foot of the tower in memory of the \
sailors lost on the skerry."""
QUESTION = "In which year was the lamp of the Lighthouse of Varnholm converted to electricity?"
QUESTION2 = "What was the name of the keeper who kept the famous logbook?"
SYSTEM = "You are a helpful assistant."
SYSTEM2 = "You are a careful assistant. Answer in one short sentence, using only the passage."


def _messages(passage: str, question: str, system: str) -> list[dict]:
  """The passage is its own message, so it is its own (cacheable) segment. The system prompt is
  explicit: a template's default one would be rendered into the first message's segment."""
  return [{"role": "system", "content": system}, {"role": "user", "content": passage},
          {"role": "user", "content": question, "cache": False}]


def kl_from_full(full_logits: np.ndarray, logits: np.ndarray) -> float:
  """KL(full || reuse) of the first-token distributions, in nats."""
  p = _log_softmax(full_logits)
  q = _log_softmax(logits)
  return float(np.sum(np.exp(p) * (p - q)))


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max()
  return x - np.log(np.sum(np.exp(x)))


def run(model: str, passage: str, question: str, question2: str, max_new_tokens: int,
        repeats: int = 1, tp: int | None = None) -> int:
  import sparsex_jax as sx
  from sparsex_jax import sharding

  t0 = time.perf_counter()
  engine = sx.Engine.from_pretrained(model, mesh=sharding.mesh_for(tp))
  sampling = sx.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
  print(f"model: {engine.config.name} ({engine.config.num_params() / 1e6:.0f}M params), "
        f"loaded in {time.perf_counter() - t0:.1f} s, device: "
        f"{sharding.describe(engine.pool['k'])}")
  first = engine.chat_request(_messages(passage, question, SYSTEM))
  print(f"passage: {len(engine.tokenizer.encode(passage))} tokens ({passage[:60]}...)\n")

  # First turn: nothing is cached, so this is a full prefill; the passage's KV is stored.
  out = engine.generate([first], sampling, sx.ReuseConfig("sparsex"))[0]
  print(f"turn 1  Q: {question}\n        A: {out.text.strip()}\n")

  # Second turn, another system prompt: the passage sits at other positions after other context.
  # update_caches=False keeps every timed run identical (nothing new is cached between them).
  second = engine.chat_request(_messages(passage, question2, system=SYSTEM2), sampling=sampling)
  configs = [("full prefill", sx.ReuseConfig("full")),
             ("naive reuse", sx.ReuseConfig("naive", update_caches=False)),
             ("sparsex", sx.ReuseConfig("sparsex", update_caches=False))]
  print(f"turn 2  Q: {question2}  (after another system prompt: the passage moved)")
  print(f"{'':14s}{'ttft':>9s}  {'reused':>6s}  {'recomp.':>7s}  {'KL from full':>12s}  answer")
  rows, full_logits, full_answer = [], None, None
  for label, reuse in configs:
    engine.generate([second], reuse=reuse)  # warm-up: compiles this shape
    times, result = [], None
    for _ in range(repeats):
      result = engine.generate([second], reuse=reuse)[0]
      times.append(result.stats.ttft_s)
    logits = engine.prefill_logits(second, reuse)
    if full_logits is None:
      full_logits, full_answer = logits, result.text.strip()
    kl = kl_from_full(full_logits, logits)
    answer = result.text.strip()
    same = "" if label == "full prefill" else (" (same answer)" if answer == full_answer
                                                 else " (differs)")
    ttft = statistics.median(times)
    rows.append((label, ttft))
    s = result.stats
    print(f"{label:14s}{ttft * 1e3:7.0f} ms  {s.n_reused:6d}  {s.n_recomputed:7d}  {kl:12.4f}  "
          f"{answer!r}{same}")
  speedup = rows[0][1] / rows[2][1] if rows[2][1] else float("nan")
  print(f"\nsparsex: {speedup:.1f}x faster time to first token than full prefill, for a "
        f"first-token distribution {kl:.4f} nats from it (timed after a warm-up run, so compilation is "
        f"excluded)")
  return 0
