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
class ChatShape:
  """How one kind of conversation is built and what the cache holds of it.

  chunk_tokens: the text the user pastes per turn; kept: user/assistant pairs in the measured
  prompt; drop: pairs removed (inclusive range); edit: "oldest" drops the first pairs (every kept
  turn moves), "middle" removes pairs after the first kept one (the turns before the cut stay an
  exact prefix); warm: "context" (the earlier conversation was prefilled once: its turns are
  cached computed in context) or "alone" (each earlier message is cached alone, as a message
  store that restores a session would hold it)."""

  name: str
  chunk_tokens: int
  kept: int
  drop: tuple[int, int]
  edit: str = "oldest"
  warm: str = "context"

  def __post_init__(self):
    if not 1 <= self.drop[0] <= self.drop[1] or self.kept < 1 or self.chunk_tokens < 8:
      raise ValueError(f"chat shape {self.name}: drop {self.drop} must satisfy 1 <= lo <= hi, "
                       f"kept ({self.kept}) >= 1 and chunk_tokens ({self.chunk_tokens}) >= 8")
    if self.edit not in ("oldest", "middle") or self.warm not in ("context", "alone"):
      raise ValueError(f"chat shape {self.name}: edit must be oldest|middle and warm "
                       f"context|alone, got {self.edit!r}, {self.warm!r}")


@dataclasses.dataclass(frozen=True)
class AgentShape:
  """One kind of multi-agent workflow.

  kind: "pipeline" (planner, researcher, answerer; every shared message cached in the context
  of another agent's prompt), "tool-cache" (the search results come from a tool cache: each
  computed alone; the plan and notes in context), "debate" (two debaters quote the results and
  each other; a judge reads both). tools: results per prompt (inclusive range); tool_tokens:
  tokens per result (inclusive range, drawn per result)."""

  name: str
  kind: str
  tools: tuple[int, int]
  tool_tokens: tuple[int, int]

  def __post_init__(self):
    if self.kind not in ("pipeline", "tool-cache", "debate"):
      raise ValueError(f"agent shape {self.name}: unknown kind {self.kind!r}")
    if not 2 <= self.tools[0] <= self.tools[1] or not 16 <= self.tool_tokens[0] <= self.tool_tokens[1]:
      raise ValueError(f"agent shape {self.name}: tools {self.tools} needs 2 <= lo <= hi and "
                       f"tool_tokens {self.tool_tokens} 16 <= lo <= hi")


CHAT_SHAPES = (
    ChatShape("drop-oldest", chunk_tokens=150, kept=5, drop=(2, 4)),
    ChatShape("short-turns", chunk_tokens=50, kept=10, drop=(1, 6)),
    ChatShape("long-turns", chunk_tokens=320, kept=3, drop=(1, 2)),
    ChatShape("edit-middle", chunk_tokens=150, kept=5, drop=(1, 2), edit="middle"),
    ChatShape("cached-alone", chunk_tokens=150, kept=5, drop=(2, 4), warm="alone"),
)
AGENT_SHAPES = (
    AgentShape("pipeline", "pipeline", tools=(4, 4), tool_tokens=(260, 260)),
    AgentShape("tool-cache", "tool-cache", tools=(3, 6), tool_tokens=(120, 400)),
    AgentShape("debate", "debate", tools=(2, 3), tool_tokens=(250, 400)),
)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Context sizes and shapes of the workloads; `quick` shrinks them for a CPU smoke run.

  Generated prompts cycle through the genres (prompt i: genres[i % len]) and, for chat and
  agent, through the shapes (shape i // len(genres) % len(shapes)), so every genre and shape
  gets its share."""

  genres: tuple[str, ...] = txt.GENRES
  musique_passages: int = 8  # at most; the context budget below usually ends the list first
  musique_context_tokens: int = 3300  # passages are cut to this many tokens in all
  needle_contexts: tuple[int, ...] = (2048, 4096, 6144)
  needle_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
  needle_passage_tokens: tuple[int, ...] = (256, 512, 1024)  # drawn per prompt
  chat_shapes: tuple[ChatShape, ...] = CHAT_SHAPES
  agent_shapes: tuple[AgentShape, ...] = AGENT_SHAPES
  # Measured prompts outside these token bands are drawn again (same seed stream): prompts of one
  # workload then fall in one of the engine's shape buckets, so a full grid compiles ~30 programs
  # per workload instead of ~100 (compilation, not prefill, dominates a GPU evaluation).
  chat_band: tuple[int, int] | None = (1060, 1280)
  agent_band: tuple[int, int] | None = (1300, 1520)

  @classmethod
  def quick(cls) -> "Sizes":
    return cls(musique_passages=2, musique_context_tokens=600, needle_contexts=(384,),
               needle_depths=(0.3, 0.7), needle_passage_tokens=(128,),
               chat_shapes=(ChatShape("drop-oldest", 40, 2, (1, 2)),
                            ChatShape("cached-alone", 40, 2, (1, 1), warm="alone")),
               agent_shapes=(AgentShape("pipeline", "pipeline", (2, 2), (64, 64)),
                             AgentShape("debate", "debate", (2, 2), (48, 64))),
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
# Text of one genre and split, in token-sized pieces
# ------------------------------------------------------------------------------------------------

class TextCorpus:
  """The sentences of one genre's documents of one split, with their token counts (counted
  once). Even document indices are dev, odd ones test (text.split_of)."""

  def __init__(self, tok, genre: str, split: str):
    docs = txt.load_documents(genre)
    self.genre = genre
    self.names = [name for i, (name, _) in enumerate(docs) if txt.split_of(i, split)]
    order = [i for i in range(len(docs)) if txt.split_of(i, split)]
    self.sentences = txt.essay_sentences(docs, np.asarray(order))
    # Very long "sentences" (lists, code) would make pieces overshoot their size: cut them.
    self.sentences = [p for s in self.sentences for p in _cut_long(s, 400)]
    self.counts = np.array([_ntok(tok, s) for s in self.sentences])
    if self.counts.sum() < 20000:
      raise ValueError(f"only {self.counts.sum()} tokens of {genre} text in the {split} split")

  def window(self, rng: np.random.Generator, n_tokens: int) -> list[str]:
    """Consecutive sentences (wrapping around) from a random start, about n_tokens in all."""
    i = int(rng.integers(len(self.sentences)))
    out, total = [], 0
    while total < n_tokens:
      out.append(self.sentences[i % len(self.sentences)])
      total += int(self.counts[i % len(self.sentences)])
      i += 1
    return out


class Texts:
  """The corpora of one split, each loaded (and its tokens counted) when first asked for."""

  def __init__(self, tok, split: str, genres: Sequence[str] = txt.GENRES):
    for g in genres:
      if g not in txt.GENRES:
        raise ValueError(f"unknown genre {g!r}; choose from {txt.GENRES}")
    if not genres:
      raise ValueError("at least one genre is needed")
    self.tok, self.split, self.genres = tok, split, tuple(genres)
    self._corpora: dict[str, TextCorpus] = {}

  def corpus(self, genre: str) -> TextCorpus:
    if genre not in self._corpora:
      self._corpora[genre] = TextCorpus(self.tok, genre, self.split)
    return self._corpora[genre]

  def pick(self, i: int) -> TextCorpus:
    """Prompt i's corpus: the genres in turn."""
    return self.corpus(self.genres[i % len(self.genres)])


# What the user calls the text in chat prompts, per genre.
_DOC_WORD = {"essays": "essay", "news": "news report", "reference": "documentation"}


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
        info={"genre": "wikipedia", "shape": "passages-alone", "n_passages": len(passages),
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


def _consistent(tok, conversations: dict[str, list[dict]], generation: str) -> dict[str, list[str]]:
  """Each conversation rendered one string per message (`generation`'s with the generation
  prompt last); raises if a message shared by two conversations renders differently in them
  (then its cached K/V could not be found by content)."""
  out, seen = {}, {}
  for name, messages in conversations.items():
    rendered = render_messages(tok, messages, add_generation_prompt=(name == generation))
    for m, r in zip(messages, rendered):
      key = (m["role"], m["content"])
      if seen.setdefault(key, r) != r:
        raise ValueError(f"the chat template renders a {m['role']} message differently in the "
                         f"{name} prompt: one Segment per message cannot be reused there")
    out[name] = rendered
  return out


def _measured(rendered: list[str]) -> list[sx.Segment]:
  """Segments of a measured prompt: one per message; the last message and the generation
  prompt together are new (never cached)."""
  return [sx.Segment(s) for s in rendered[:-2]] + [
      sx.Segment(rendered[-2] + rendered[-1], cache=False)]


# ------------------------------------------------------------------------------------------------
# 2. Needle QA
# ------------------------------------------------------------------------------------------------

NEEDLE_SYSTEM = "You are a helpful assistant. Answer questions about the document you are given."
NEEDLE_INSTRUCTION = "Read the document below, then answer the question that follows it."


def needle_prompts(tok, texts: Texts, split: str, n: int, sizes: Sizes = Sizes(),
                   seed: int = 0) -> list[Prompt]:
  """A fact planted at a depth of a text window, split into passages cached alone.

  Prompt i takes genre i % G, context size (i // G) % S and depth (i // (G S)) % D, so every
  cell is covered evenly; its passage length is drawn from needle_passage_tokens."""
  prompts = []
  n_genres, n_sizes = len(texts.genres), len(sizes.needle_contexts)
  for i in range(n):
    rng = _rng(seed, "needle", split, i)
    corpus = texts.pick(i)
    size = sizes.needle_contexts[(i // n_genres) % n_sizes]
    depth = sizes.needle_depths[(i // (n_genres * n_sizes)) % len(sizes.needle_depths)]
    passage_tokens = int(rng.choice(sizes.needle_passage_tokens))
    fact = txt.make_fact(rng)
    sentences = corpus.window(rng, size - _ntok(tok, fact.sentence))
    counts = np.cumsum([_ntok(tok, s) + 1 for s in sentences])
    at = int(np.searchsorted(counts, depth * counts[-1]))  # insert before sentence `at`
    sentences = sentences[:at] + [fact.sentence] + sentences[at:]
    # Passages of about passage_tokens, cut at sentence boundaries; each is cached alone.
    passages = [p + "\n" for p in _pack(tok, sentences, passage_tokens)]
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
        workload="needle", split=split, index=i, item=f"{corpus.genre}[{split}] + fact",
        request=sx.Request(segments),
        warm=(WarmStep("prefix", (sx.Segment(head),)),
              WarmStep("segments", tuple(sx.Segment(p) for p in passages))),
        answers=(fact.answer,), task_metric="contains",
        info={"genre": corpus.genre, "shape": "passages-alone", "context_size": size,
              "depth": depth, "passage_tokens": passage_tokens, "context_tokens": n_context,
              "fact_token_depth": before / max(n_context, 1), "fact_passage": where[0],
              "n_passages": len(passages), "fact": fact.sentence, "question": fact.question}))
  return prompts


# ------------------------------------------------------------------------------------------------
# 3. Multi-turn chat: turns dropped or edited
# ------------------------------------------------------------------------------------------------

CHAT_SYSTEMS = (
    "You are a thoughtful reading companion. Keep your answers short.",
    "You are a helpful assistant discussing texts with the user. Be concise.",
    "You are an attentive assistant. Remember what the user tells you and answer briefly.",
)


def _key_line(chunk_sentences: list[str]) -> str:
  """The reply's quoted line: the chunk's longest sentence (real text, deterministic)."""
  return max(chunk_sentences, key=len)


def chat_prompts(tok, texts: Texts, split: str, n: int, sizes: Sizes = Sizes(),
                 seed: int = 0) -> list[Prompt]:
  """A conversation about a text, some of whose turns were then dropped (ChatShape).

  Warm-up: the earlier conversation (system + kept + d user/assistant pairs, one Segment per
  message), prefilled once (its turns cached in context) or each message cached alone.
  Measured: the conversation without the d dropped pairs + a new question about a fact the user
  mentioned in one of the kept turns. Every kept turn after the cut sits d pairs earlier than
  before: non-prefix hits."""
  prompts = []
  n_genres, n_shapes = len(texts.genres), len(sizes.chat_shapes)
  for i in range(n):
    rng = _rng(seed, "chat", split, i)
    corpus = texts.pick(i)
    shape = sizes.chat_shapes[(i // n_genres) % n_shapes]
    for _attempt in range(100):  # redraw until the prompt is in its token band
      fact = txt.make_fact(rng)
      drop = int(rng.integers(shape.drop[0], shape.drop[1] + 1))
      turns = shape.kept + drop
      # "oldest": pairs [0, drop) go; "middle": pairs [cut, cut + drop), cut >= 1.
      cut = 0 if shape.edit == "oldest" or shape.kept == 1 else int(
          rng.integers(1, shape.kept))
      kept_pairs = [t for t in range(turns) if not cut <= t < cut + drop]
      fact_turn = int(rng.choice(kept_pairs))
      window = corpus.window(rng, turns * shape.chunk_tokens)
      chunks = _pack(tok, window, shape.chunk_tokens)[:turns]
      while len(chunks) < turns:  # a window that packed short: extend it
        chunks.append(" ".join(corpus.window(rng, shape.chunk_tokens)))
      system = CHAT_SYSTEMS[int(rng.integers(len(CHAT_SYSTEMS)))]
      messages = [{"role": "system", "content": system}]
      for t, chunk in enumerate(chunks):
        user = (f"Here is the next part of the {_DOC_WORD[corpus.genre]} I'm reading:\n\n"
                f"{chunk}\n\nWhat is the key point?")
        if t == fact_turn:
          user += f" Unrelated, but so I don't forget: {fact.sentence}"
        messages.append({"role": "user", "content": user})
        line = _key_line(txt.split_sentences(chunk))
        messages.append({"role": "assistant", "content": f"The key line is: \"{line}\""})
      kept = [messages[0]] + [m for t in kept_pairs for m in messages[1 + 2 * t:3 + 2 * t]]
      question = {"role": "user", "content": f"Quick question: {fact.question} "
                                             f"Answer in a few words."}
      r = _consistent(tok, {"earlier": messages, "now": kept + [question]}, "now")
      earlier, now = r["earlier"], r["now"]
      segments = _measured(now)
      first = tuple(sx.Segment(x) for x in earlier)
      warm = (WarmStep("context", first),) if shape.warm == "context" else (
          WarmStep("prefix", first[:1]), WarmStep("segments", first[1:]))
      old = segment_starts(tok, first)
      new = segment_starts(tok, segments)
      kept_idx = [1 + 2 * t + j for t in kept_pairs for j in range(2)]  # in `earlier`
      prompt = Prompt(
          workload="chat", split=split, index=i, item=f"{corpus.genre}[{split}] + fact",
          request=sx.Request(segments), warm=warm,
          answers=(fact.answer,), task_metric="contains",
          info={"genre": corpus.genre, "shape": shape.name, "turns": turns,
                "dropped_turns": drop, "cut": cut, "fact_turn": fact_turn,
                "kept_old_starts": [old[m] for m in kept_idx],
                "kept_new_starts": new[1:1 + len(kept_idx)],
                "fact": fact.sentence, "question": fact.question})
      if _in_band(tok, prompt.request.segments, sizes.chat_band):
        break
    else:
      raise ValueError(f"chat prompt {i} ({shape.name}): no draw of 100 fell in the token band "
                       f"{sizes.chat_band}; widen it")
    prompts.append(prompt)
  return prompts


# ------------------------------------------------------------------------------------------------
# 4. Agent workflows
# ------------------------------------------------------------------------------------------------

AGENT_SYSTEMS = {
    "planner": "You are the planner of a research team. Break the task into short steps.",
    "researcher": ("You are the researcher of a team. Read the search results carefully and "
                   "report what they contain."),
    "answerer": ("You are the answerer of a team. Using the team's messages and the search "
                 "results, give the final answer in a few words."),
    "debater_a": ("You are debater A. Argue, from the search results, where the answer to the "
                  "task is to be found."),
    "debater_b": ("You are debater B. Examine debater A's argument against the search results "
                  "and reply."),
    "judge": ("You are the judge of a debate. Read the debaters and the search results, then "
              "give the final answer in a few words."),
}
_PLANS = (
    "[planner] Plan: 1. Search the archive for anything that answers the task. 2. Read "
    "every search result closely; the answer may be a single sentence. 3. Reply with the answer "
    "in a few words.",
    "[planner] Steps: first, run a search over the archive. Second, the researcher reads each "
    "result and notes what matters. Third, the answerer replies briefly.",
    "[planner] Let's search the archive, check each result for the fact we need, and keep the "
    "final answer short.",
)


def _other_order(rng: np.random.Generator, n: int) -> np.ndarray:
  perm = rng.permutation(n)
  if n > 1 and np.all(perm == np.arange(n)):
    perm = np.roll(perm, 1)
  return perm


def agent_prompts(tok, texts: Texts, split: str, n: int, sizes: Sizes = Sizes(),
                  seed: int = 0) -> list[Prompt]:
  """Agents with different system prompts share a task, search results (text with a planted
  fact in one of them) and each other's messages, each at other positions (AgentShape).

  pipeline: the planner's prompt (system, task, plan) and the researcher's (system, task, plan,
    results, notes) each prefilled once; measured: the answerer's (system, task, notes, the
    results in another order, plan, instruction).
  tool-cache: the same answerer prompt, but the results were cached alone (a tool cache) and the
    researcher's notes were written in a prompt without them.
  debate: debater A's prompt (system, task, results, A's argument quoting a result) and B's
    (system, task, results in another order, A, B's reply quoting A and a result) each
    prefilled once; measured: the judge's (system, task, A, B, results in a third order,
    instruction)."""
  prompts = []
  n_genres, n_shapes = len(texts.genres), len(sizes.agent_shapes)
  sys_msg = {k: {"role": "system", "content": v} for k, v in AGENT_SYSTEMS.items()}
  for i in range(n):
    rng = _rng(seed, "agent", split, i)
    corpus = texts.pick(i)
    shape = sizes.agent_shapes[(i // n_genres) % n_shapes]
    for _attempt in range(100):  # redraw until the prompt is in its token band
      fact = txt.make_fact(rng)
      n_tools = int(rng.integers(shape.tools[0], shape.tools[1] + 1))
      tools = [corpus.window(rng, int(rng.integers(shape.tool_tokens[0], shape.tool_tokens[1] + 1)))
               for _ in range(n_tools)]
      fact_tool = int(rng.integers(n_tools))
      at = int(rng.integers(1, len(tools[fact_tool]) + 1))
      tools[fact_tool] = tools[fact_tool][:at] + [fact.sentence] + tools[fact_tool][at:]
      tool_msgs = [{"role": "tool", "content": "[search result] " + " ".join(t)} for t in tools]
      task = {"role": "user", "content": f"Task for the team: {fact.question}"}
      final = {"role": "user", "content": "[final turn] Give the answer to the task in a few "
                                          "words."}
      perm = _other_order(rng, n_tools)
      if shape.kind == "debate":
        # Each debater quotes a result's sentence (never the planted fact): agents that quote
        # the results and each other.
        q_a = tools[int(rng.integers(n_tools))][0]
        q_b = tools[int(rng.integers(n_tools))][-1]
        arg_a = {"role": "assistant", "content": f"[debater A] The answer should follow from the "
                                                 f"result that says \"{q_a}\""}
        arg_b = {"role": "assistant", "content": f"[debater B] A relies on \"{q_a}\", but another "
                                                 f"result says \"{q_b}\"; read them all."}
        perm2 = _other_order(rng, n_tools)
        convs = {
            "a": [sys_msg["debater_a"], task] + tool_msgs + [arg_a],
            "b": [sys_msg["debater_b"], task] + [tool_msgs[j] for j in perm] + [arg_a, arg_b],
            "judge": [sys_msg["judge"], task, arg_a, arg_b] + [tool_msgs[j] for j in perm2]
                     + [final]}
        r = _consistent(tok, convs, "judge")
        warm = (WarmStep("context", tuple(sx.Segment(x) for x in r["a"])),
                WarmStep("context", tuple(sx.Segment(x) for x in r["b"])))
        measured = r["judge"]
      else:
        plan = {"role": "assistant", "content": _PLANS[int(rng.integers(len(_PLANS)))]}
        # The researcher quotes the opening sentence of each result (never the planted fact).
        openings = "; ".join(f"\"{t[0]}\"" for t in tools)
        notes = {"role": "assistant",
                 "content": f"[researcher] I read {n_tools} search results. They open with: "
                            f"{openings}. The answer should be in one of them."}
        researcher = [sys_msg["researcher"], task, plan] + (
            tool_msgs if shape.kind == "pipeline" else []) + [notes]
        convs = {"planner": [sys_msg["planner"], task, plan], "researcher": researcher,
                 "answerer": [sys_msg["answerer"], task, notes] + [tool_msgs[j] for j in perm]
                             + [plan, final]}
        r = _consistent(tok, convs, "answerer")
        if shape.kind == "pipeline":
          tool_warm = ()
        else:  # the results come from a tool cache: each computed alone
          rendered = dict(zip([m["content"] for m in convs["answerer"]], r["answerer"]))
          tool_warm = (WarmStep("segments", tuple(sx.Segment(rendered[m["content"]])
                                                  for m in tool_msgs)),)
        warm = tool_warm + (WarmStep("context", tuple(sx.Segment(x) for x in r["planner"])),
                            WarmStep("context", tuple(sx.Segment(x) for x in r["researcher"])))
        measured = r["answerer"]
      prompt = Prompt(
          workload="agent", split=split, index=i, item=f"{corpus.genre}[{split}] + fact",
          request=sx.Request(_measured(measured)), warm=warm,
          answers=(fact.answer,), task_metric="contains",
          info={"genre": corpus.genre, "shape": shape.name, "tools": n_tools,
                "fact_tool": fact_tool, "tool_order": perm.tolist(),
                "fact": fact.sentence, "question": fact.question})
      if _in_band(tok, prompt.request.segments, sizes.agent_band):
        break
    else:
      raise ValueError(f"agent prompt {i} ({shape.name}): no draw of 100 fell in the token band "
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
  texts = Texts(tok, split, sizes.genres)
  for w in workloads:
    if w == "musique":
      if musique_items is None:
        raise ValueError("the musique workload needs the MuSiQue items (--data)")
      out[w] = musique_prompts(tok, musique_items, split, n, sizes, seed)
      continue
    out[w] = {"needle": needle_prompts, "chat": chat_prompts,
              "agent": agent_prompts}[w](tok, texts, split, n, sizes, seed)
  return out
