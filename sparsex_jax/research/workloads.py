"""The four workloads: prompts as lists of sx.Segment, each with the cache state it needs.

A Prompt carries the measured request and its warm-up: the steps that put the cache into the state
a real system would be in just before that request arrives (a RAG corpus precomputed alone; an
earlier conversation or another agent's prompt computed in context). The runner applies the
warm-up once per prompt, then runs every method on the same cache state.

Prompts are deterministic in (seed, workload, split, index). Dev and test prompts come from
disjoint MuSiQue items and disjoint essays (text.split_of), so test text was never tuned on.

Workloads (names as on the command line):
  musique  MuSiQue multi-hop RAG: passages cached alone, question new; SQuAD token F1.
  needle   a made-up fact planted at a depth of a 2K/4K/6K-token essay context split into
           passages cached alone; accuracy = the answer appears in the greedy output.
  chat     a conversation about an essay, run once (its turns stored computed in context); the next
           request drops the oldest turns, so the kept turns move to new positions.
  agent    planner, researcher and answerer agents (different system prompts) sharing tool
           outputs (essay text, one with a planted fact) and each other's messages at other
           positions; the answerer's prompt is measured.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

import sparsex_jax as sx
from sparsex_jax.research import text as txt

WORKLOADS = ("musique", "needle", "chat", "agent")
_WORKLOAD_ID = {name: i for i, name in enumerate(WORKLOADS)}
_SPLIT_ID = {"dev": 0, "test": 1}

# Warm-up step kinds. "segments": engine.cache_segments (each segment computed alone at position
# 0, as a RAG corpus or a returned tool output would be). "prefix": a prefill whose full pages
# enter the prefix cache (a shared system prompt already served). "context": a prefill that stores
# its cacheable segments computed in context, at their positions there (an earlier request).
WARM_KINDS = ("segments", "prefix", "context")


@dataclasses.dataclass(frozen=True)
class WarmStep:
  kind: str
  segments: tuple[sx.Segment, ...]

  def __post_init__(self):
    if self.kind not in WARM_KINDS:
      raise ValueError(f"unknown warm-up kind {self.kind!r}; choose one of {WARM_KINDS}")
    if not self.segments:
      raise ValueError("a warm-up step needs at least one segment")


@dataclasses.dataclass(frozen=True)
class Prompt:
  workload: str
  split: str
  index: int  # position in this workload's prompt list for the split
  item: str  # where the text came from (MuSiQue item, essays), for the record
  request: sx.Request
  warm: tuple[WarmStep, ...]
  answers: tuple[str, ...]
  task_metric: str  # "f1" (best SQuAD token F1 over answers) or "contains" (answer in output)
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def key(self) -> str:
    return f"{self.workload}/{self.split}/{self.index}"


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Context sizes of the workloads; `quick` shrinks them for a CPU smoke run."""

  musique_passages: int = 8  # at most; the context budget below usually ends the list first
  musique_context_tokens: int = 3300  # passages are cut to this many tokens in all
  needle_contexts: tuple[int, ...] = (2048, 4096, 6144)
  needle_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
  needle_passage_tokens: int = 512
  chat_kept: int = 5  # user/assistant pairs kept; the conversation had chat_kept + dropped
  chat_chunk_tokens: int = 150
  chat_drop: tuple[int, int] = (2, 4)  # oldest turn pairs dropped, inclusive range
  agent_tools: int = 4
  agent_tool_tokens: int = 260
  # Measured prompts outside these token bands are drawn again (same seed stream): prompts of one
  # workload then fall in one of the engine's shape buckets, so a full grid compiles ~30 programs
  # per workload instead of ~100 (compilation, not prefill, dominates a GPU evaluation).
  chat_band: tuple[int, int] | None = (1060, 1280)
  agent_band: tuple[int, int] | None = (1300, 1520)

  @classmethod
  def quick(cls) -> "Sizes":
    return cls(musique_passages=2, musique_context_tokens=600, needle_contexts=(384,),
               needle_depths=(0.3, 0.7), needle_passage_tokens=128, chat_kept=2,
               chat_chunk_tokens=40, chat_drop=(1, 2), agent_tools=2, agent_tool_tokens=64,
               chat_band=None, agent_band=None)


def _rng(seed: int, workload: str, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _WORKLOAD_ID[workload], _SPLIT_ID[split], index])


def _ntok(tok, s: str) -> int:
  return len(tok.encode(s))


# ------------------------------------------------------------------------------------------------
# Chat template helpers: one string per message
# ------------------------------------------------------------------------------------------------

def render_messages(tok, messages: Sequence[dict], add_generation_prompt: bool = False
                    ) -> list[str]:
  """The chat-template text of each message (and, last, the generation prompt if asked), such
  that their concatenation is the rendered conversation.

  Renders growing prefixes of the conversation and takes the differences, so any template whose
  rendering of a conversation extends the rendering of its prefix works; others raise."""
  if not messages:
    raise ValueError("render_messages needs at least one message")
  out, prev = [], ""
  for k in range(1, len(messages) + 1):
    cur = tok.apply_chat_template(list(messages[:k]), add_generation_prompt=False)
    if not cur.startswith(prev):
      raise ValueError(f"the chat template does not render message {k - 1} as an extension of "
                       f"the messages before it: one Segment per message is not possible")
    out.append(cur[len(prev):])
    prev = cur
  if add_generation_prompt:
    cur = tok.apply_chat_template(list(messages), add_generation_prompt=True)
    if not cur.startswith(prev) or cur == prev:
      raise ValueError("the chat template's generation prompt does not extend the conversation")
    out.append(cur[len(prev):])
  if any(not s for s in out):
    raise ValueError("the chat template rendered a message as empty text")
  return out


def _rag_head_tail(tok, system: str, instruction: str, question: str) -> tuple[str, str]:
  """A single-user-turn RAG prompt cut around the documents: (head, tail).

  The head (system prompt, turn start, instruction) is shared by every prompt of a workload; the
  tail (question, end of turn, generation prompt) is new."""
  marker = "\x00DOCUMENTS\x00"
  rendered = tok.apply_chat_template(
      [{"role": "system", "content": system},
       {"role": "user", "content": f"{instruction}\n\n{marker}Question: {question}"}],
      add_generation_prompt=True)
  if rendered.count(marker) != 1:
    raise ValueError("the chat template altered the document marker")
  head, tail = rendered.split(marker)
  return head, tail


def segment_starts(tok, segments: Sequence[sx.Segment]) -> list[int]:
  """Token position where each segment starts (segments are tokenized one by one, as the engine
  does)."""
  starts, pos = [], 0
  for s in segments:
    starts.append(pos)
    pos += _ntok(tok, s.content) if isinstance(s.content, str) else len(s.content)
  return starts


# ------------------------------------------------------------------------------------------------
# Essay text in token-sized pieces
# ------------------------------------------------------------------------------------------------

class EssayText:
  """The sentences of one split's essays with their token counts (counted once)."""

  def __init__(self, tok, split: str):
    essays = txt.load_essays()
    self.names = [name for i, (name, _) in enumerate(essays) if txt.split_of(i, split)]
    order = [i for i in range(len(essays)) if txt.split_of(i, split)]
    self.sentences = txt.essay_sentences(essays, np.asarray(order))
    # Very long "sentences" (lists, code) would make pieces overshoot their size: cut them.
    self.sentences = [p for s in self.sentences for p in _cut_long(s, 400)]
    self.counts = np.array([_ntok(tok, s) for s in self.sentences])
    if self.counts.sum() < 20000:
      raise ValueError(f"only {self.counts.sum()} tokens of essay text in the {split} split")

  def window(self, rng: np.random.Generator, n_tokens: int) -> list[str]:
    """Consecutive sentences (wrapping around) from a random start, about n_tokens in all."""
    i = int(rng.integers(len(self.sentences)))
    out, total = [], 0
    while total < n_tokens:
      out.append(self.sentences[i % len(self.sentences)])
      total += int(self.counts[i % len(self.sentences)])
      i += 1
    return out


def _cut_long(sentence: str, max_words: int) -> list[str]:
  words = sentence.split()
  return [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]


def _pack(tok, sentences: list[str], target: int) -> list[str]:
  """Groups consecutive sentences into pieces of about `target` tokens (never splitting one)."""
  pieces, cur, cur_n = [], [], 0
  for s in sentences:
    n = _ntok(tok, s) + 1
    if cur and cur_n + n > target:
      pieces.append(" ".join(cur))
      cur, cur_n = [], 0
    cur.append(s)
    cur_n += n
  if cur:
    pieces.append(" ".join(cur))
  return pieces


# ------------------------------------------------------------------------------------------------
# 1. MuSiQue RAG
# ------------------------------------------------------------------------------------------------

MUSIQUE_SYSTEM = "You are a helpful assistant that answers questions from documents."
MUSIQUE_INSTRUCTION = ("Answer the question using the documents below. Give only the answer, "
                       "in a few words.")


def musique_prompts(tok, items: list[dict], split: str, n: int, sizes: Sizes = Sizes(),
                    seed: int = 0) -> list[Prompt]:
  """MuSiQue RAG prompts from the split's items (even item indices dev, odd test), in order.

  Passages are the item's first `musique_passages` contexts, each its own segment cached alone at
  position 0; the instruction head is a prefix-cache hit; the question is new."""
  del seed  # the items are taken in order; nothing random
  prompts = []
  for i, item in enumerate(items):
    if len(prompts) == n:
      break
    if not txt.split_of(i, split):
      continue
    passages, budget = [], sizes.musique_context_tokens
    for c in item["ctxs"][:sizes.musique_passages]:
      title = (c.get("title") or "").strip()
      body = f"Document: {title + '. ' if title else ''}{' '.join(c['text'].split())}"
      sep = "\n\n"
      n_body = _ntok(tok, body + sep)
      if n_body > budget:  # the last passage is cut (at a word) to fill the budget exactly
        body = _truncate_words(tok, body, budget - _ntok(tok, sep))
        n_body = _ntok(tok, body + sep) if body else 0
      if not body:
        break
      passages.append(body + sep)
      budget -= n_body
      if budget < 32:
        break
    head, tail = _rag_head_tail(tok, MUSIQUE_SYSTEM, MUSIQUE_INSTRUCTION, item["question"].strip())
    segments = [sx.Segment(head)] + [sx.Segment(p) for p in passages] + [
        sx.Segment(tail, cache=False)]
    prompts.append(Prompt(
        workload="musique", split=split, index=len(prompts), item=f"musique[{i}]",
        request=sx.Request(segments),
        warm=(WarmStep("prefix", (sx.Segment(head),)),
              WarmStep("segments", tuple(sx.Segment(p) for p in passages))),
        answers=tuple(item["answers"]), task_metric="f1",
        info={"n_passages": len(passages),
              "context_tokens": sum(_ntok(tok, p) for p in passages)}))
  return prompts


def _truncate_words(tok, text: str, max_tokens: int) -> str:
  """The longest word prefix of text with at most max_tokens tokens (binary search)."""
  words = text.split(" ")
  lo, hi = 0, len(words)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if _ntok(tok, " ".join(words[:mid])) <= max_tokens:
      lo = mid
    else:
      hi = mid - 1
  return " ".join(words[:lo])


def _in_band(tok, segments, band) -> bool:
  if band is None:
    return True
  n = sum(_ntok(tok, s.content) for s in segments)
  return band[0] <= n <= band[1]


# ------------------------------------------------------------------------------------------------
# 2. Needle QA
# ------------------------------------------------------------------------------------------------

NEEDLE_SYSTEM = "You are a helpful assistant. Answer questions about the document you are given."
NEEDLE_INSTRUCTION = "Read the document below, then answer the question that follows it."


def needle_prompts(tok, essays: EssayText, split: str, n: int, sizes: Sizes = Sizes(),
                   seed: int = 0) -> list[Prompt]:
  """A fact planted at a depth of an essay context, split into passages cached alone.

  Prompt i has context size needle_contexts[i % len] and depth needle_depths[(i // len) % len],
  so every (size, depth) cell is covered evenly."""
  prompts = []
  n_sizes = len(sizes.needle_contexts)
  for i in range(n):
    rng = _rng(seed, "needle", split, i)
    size = sizes.needle_contexts[i % n_sizes]
    depth = sizes.needle_depths[(i // n_sizes) % len(sizes.needle_depths)]
    fact = txt.make_fact(rng)
    sentences = essays.window(rng, size - _ntok(tok, fact.sentence))
    counts = np.cumsum([_ntok(tok, s) + 1 for s in sentences])
    at = int(np.searchsorted(counts, depth * counts[-1]))  # insert before sentence `at`
    sentences = sentences[:at] + [fact.sentence] + sentences[at:]
    # Passages of about needle_passage_tokens, cut at sentence boundaries; each is cached alone.
    passages = [p + "\n" for p in _pack(tok, sentences, sizes.needle_passage_tokens)]
    where = [k for k, p in enumerate(passages) if fact.sentence in p]
    if len(where) != 1:
      raise AssertionError(f"needle prompt {i}: the fact landed in {len(where)} passages")
    head, tail = _rag_head_tail(tok, NEEDLE_SYSTEM, NEEDLE_INSTRUCTION,
                                f"{fact.question} Answer in a few words.")
    segments = [sx.Segment(head)] + [sx.Segment(p) for p in passages] + [
        sx.Segment(tail, cache=False)]
    n_context = sum(_ntok(tok, p) for p in passages)
    before = sum(_ntok(tok, p) for p in passages[:where[0]]) + _ntok(
        tok, passages[where[0]].split(fact.sentence)[0])
    prompts.append(Prompt(
        workload="needle", split=split, index=i, item=f"essays[{split}] + fact",
        request=sx.Request(segments),
        warm=(WarmStep("prefix", (sx.Segment(head),)),
              WarmStep("segments", tuple(sx.Segment(p) for p in passages))),
        answers=(fact.answer,), task_metric="contains",
        info={"context_size": size, "depth": depth, "context_tokens": n_context,
              "fact_token_depth": before / max(n_context, 1), "fact_passage": where[0],
              "n_passages": len(passages), "fact": fact.sentence, "question": fact.question}))
  return prompts


# ------------------------------------------------------------------------------------------------
# 3. Multi-turn chat with the oldest turns dropped
# ------------------------------------------------------------------------------------------------

CHAT_SYSTEMS = (
    "You are a thoughtful reading companion. Keep your answers short.",
    "You are a helpful assistant discussing essays with the user. Be concise.",
    "You are an attentive assistant. Remember what the user tells you and answer briefly.",
)


def _key_line(chunk_sentences: list[str]) -> str:
  """The reply's quoted line: the chunk's longest sentence (real text, deterministic)."""
  return max(chunk_sentences, key=len)


def chat_prompts(tok, essays: EssayText, split: str, n: int, sizes: Sizes = Sizes(),
                 seed: int = 0) -> list[Prompt]:
  """A conversation about an essay whose oldest turns were dropped.

  Warm-up: the whole earlier conversation (system + chat_kept + d user/assistant pairs, one
  Segment per message) is prefilled once, so every turn is stored computed in context at its
  original position. Measured: system + the turns after the `d` oldest pairs + a new question
  about a fact the user mentioned in one of the kept turns. The kept turns sit d pairs earlier
  than before: non-prefix hits, computed in context."""
  prompts = []
  lo, hi = sizes.chat_drop
  if not 1 <= lo <= hi or sizes.chat_kept < 1:
    raise ValueError(f"chat_drop {sizes.chat_drop} must satisfy 1 <= lo <= hi, and chat_kept "
                     f"({sizes.chat_kept}) must be >= 1")
  for i in range(n):
    rng = _rng(seed, "chat", split, i)
    for _attempt in range(100):  # redraw until the prompt is in its token band
      fact = txt.make_fact(rng)
      drop = int(rng.integers(lo, hi + 1))
      turns = sizes.chat_kept + drop
      fact_turn = int(rng.integers(drop, turns))
      window = essays.window(rng, turns * sizes.chat_chunk_tokens)
      chunks = _pack(tok, window, sizes.chat_chunk_tokens)[:turns]
      while len(chunks) < turns:  # a window that packed short: extend it
        chunks.append(" ".join(essays.window(rng, sizes.chat_chunk_tokens)))
      system = CHAT_SYSTEMS[int(rng.integers(len(CHAT_SYSTEMS)))]
      messages = [{"role": "system", "content": system}]
      for t, chunk in enumerate(chunks):
        user = (f"Here is the next part of the essay I'm reading:\n\n{chunk}\n\n"
                "What is the key point?")
        if t == fact_turn:
          user += f" Unrelated, but so I don't forget: {fact.sentence}"
        messages.append({"role": "user", "content": user})
        line = _key_line(txt.split_sentences(chunk))
        messages.append({"role": "assistant", "content": f"The key line is: \"{line}\""})
      earlier = render_messages(tok, messages)
      kept = [messages[0]] + messages[1 + 2 * drop:]
      question = {"role": "user", "content": f"Quick question: {fact.question} "
                                             f"Answer in a few words."}
      now = render_messages(tok, kept + [question], add_generation_prompt=True)
      # The kept messages render exactly as before: their cached KV can be found by content.
      if now[1:-2] != earlier[1 + 2 * drop:] or now[0] != earlier[0]:
        raise ValueError("the chat template renders a kept turn differently once turns are "
                         "dropped")
      segments = [sx.Segment(s) for s in now[:-2]] + [sx.Segment(now[-2] + now[-1], cache=False)]
      first = tuple(sx.Segment(s) for s in earlier)
      old = segment_starts(tok, first)
      new = segment_starts(tok, segments)
      prompt = Prompt(
          workload="chat", split=split, index=i, item=f"essays[{split}] + fact",
          request=sx.Request(segments), warm=(WarmStep("context", first),),
          answers=(fact.answer,), task_metric="contains",
          info={"turns": turns, "dropped_turns": drop, "fact_turn": fact_turn,
                "kept_old_starts": old[1 + 2 * drop:], "kept_new_starts": new[1:-1],
                "fact": fact.sentence, "question": fact.question})
      if _in_band(tok, prompt.request.segments, sizes.chat_band):
        break
    else:
      raise ValueError(f"chat prompt {i}: no draw of 100 fell in the token band "
                       f"{sizes.chat_band}; widen it")
    prompts.append(prompt)
  return prompts


# ------------------------------------------------------------------------------------------------
# 4. Agent workflow
# ------------------------------------------------------------------------------------------------

AGENT_SYSTEMS = {
    "planner": "You are the planner of a research team. Break the task into short steps.",
    "researcher": ("You are the researcher of a team. Read the search results carefully and "
                   "report what they contain."),
    "answerer": ("You are the answerer of a team. Using the team's messages and the search "
                 "results, give the final answer in a few words."),
}
_PLANS = (
    "[planner] Plan: 1. Search the essay archive for anything that answers the task. 2. Read "
    "every search result closely; the answer may be a single sentence. 3. Reply with the answer "
    "in a few words.",
    "[planner] Steps: first, run a search over the archive. Second, the researcher reads each "
    "result and notes what matters. Third, the answerer replies briefly.",
    "[planner] Let's search the archive, check each result for the fact we need, and keep the "
    "final answer short.",
)


def agent_prompts(tok, essays: EssayText, split: str, n: int, sizes: Sizes = Sizes(),
                  seed: int = 0) -> list[Prompt]:
  """Three agents with different system prompts share a task, tool outputs and messages.

  Warm-up, in the order a pipeline would run: the planner's prompt (its system prompt, the task,
  its plan) and then the researcher's (its system prompt, the task, the plan, the search results
  as tool messages, its notes), each prefilled once so the messages they contain are stored
  computed in THEIR context. Measured: the answerer's prompt (its own system prompt, the task,
  the researcher's notes, the search results in another order, the plan, a new instruction):
  every shared message sits at another position after other context."""
  prompts = []
  for i in range(n):
    rng = _rng(seed, "agent", split, i)
    for _attempt in range(100):  # redraw until the prompt is in its token band
      fact = txt.make_fact(rng)
      tools = []
      for _ in range(sizes.agent_tools):
        tools.append(essays.window(rng, sizes.agent_tool_tokens))
      fact_tool = int(rng.integers(sizes.agent_tools))
      at = int(rng.integers(1, len(tools[fact_tool]) + 1))
      tools[fact_tool] = tools[fact_tool][:at] + [fact.sentence] + tools[fact_tool][at:]
      tool_msgs = [{"role": "tool", "content": "[search result] " + " ".join(t)} for t in tools]
      task = {"role": "user", "content": f"Task for the team: {fact.question}"}
      plan = {"role": "assistant", "content": _PLANS[int(rng.integers(len(_PLANS)))]}
      # The researcher quotes the opening sentence of each result (never the planted fact).
      openings = "; ".join(f"\"{t[0]}\"" for t in tools)  # fact is never first
      notes = {"role": "assistant",
               "content": f"[researcher] I read {len(tools)} search results. They open with: "
                          f"{openings}. The answer should be in one of them."}
      final = {"role": "user", "content": "[answerer's turn] Give the answer to the task in a few "
                                          "words."}
      sys_msg = {k: {"role": "system", "content": v} for k, v in AGENT_SYSTEMS.items()}
      planner = render_messages(tok, [sys_msg["planner"], task, plan])
      researcher = render_messages(tok, [sys_msg["researcher"], task, plan] + tool_msgs + [notes])
      perm = rng.permutation(len(tools))
      if len(tools) > 1 and np.all(perm == np.arange(len(tools))):
        perm = np.roll(perm, 1)  # the answerer sees the results in another order
      answerer_msgs = ([sys_msg["answerer"], task, notes] + [tool_msgs[j] for j in perm]
                       + [plan, final])
      answerer = render_messages(tok, answerer_msgs, add_generation_prompt=True)
      texts = {"task": researcher[1], "plan": researcher[2], "notes": researcher[-1]}
      if planner[1:] != [texts["task"], texts["plan"]] or answerer[1] != texts["task"] or (
          answerer[2] != texts["notes"]) or answerer[-3] != texts["plan"]:
        raise ValueError("the chat template renders a shared message differently per agent")
      segments = [sx.Segment(s) for s in answerer[:-2]] + [
          sx.Segment(answerer[-2] + answerer[-1], cache=False)]
      prompt = Prompt(
          workload="agent", split=split, index=i, item=f"essays[{split}] + fact",
          request=sx.Request(segments),
          warm=(WarmStep("context", tuple(sx.Segment(s) for s in planner)),
                WarmStep("context", tuple(sx.Segment(s) for s in researcher))),
          answers=(fact.answer,), task_metric="contains",
          info={"tools": len(tools), "fact_tool": fact_tool, "tool_order": perm.tolist(),
                "fact": fact.sentence, "question": fact.question})
      if _in_band(tok, prompt.request.segments, sizes.agent_band):
        break
    else:
      raise ValueError(f"agent prompt {i}: no draw of 100 fell in the token band "
                       f"{sizes.agent_band}; widen it")
    prompts.append(prompt)
  return prompts


def build(tok, workloads: Sequence[str], split: str, n: int, sizes: Sizes = Sizes(),
          seed: int = 0, musique_items: list[dict] | None = None) -> dict[str, list[Prompt]]:
  """Prompts of every asked workload; musique needs `musique_items` (load_musique)."""
  for w in workloads:
    if w not in WORKLOADS:
      raise ValueError(f"unknown workload {w!r}; choose from {WORKLOADS}")
  if split not in _SPLIT_ID:
    raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
  out = {}
  essays = None
  for w in workloads:
    if w == "musique":
      if musique_items is None:
        raise ValueError("the musique workload needs the MuSiQue items (--data)")
      out[w] = musique_prompts(tok, musique_items, split, n, sizes, seed)
      continue
    if essays is None:
      essays = EssayText(tok, split)
    out[w] = {"needle": needle_prompts, "chat": chat_prompts,
              "agent": agent_prompts}[w](tok, essays, split, n, sizes, seed)
  return out
