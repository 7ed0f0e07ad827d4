"""Chat messages as segments: one Segment per message, rendered with the model's chat template.

A conversation rendered as one string and tokenized as one segment is only ever a prefix-cache
hit. Cut at message boundaries instead, every message is a segment of its own, so a turn that
recurs after other context (a truncated or edited history, a tool result, a retrieved passage
sent as its own message) is a segment-cache hit and SparseX reuses its KV.

How it is cut, for any template: message i's segment is the text that rendering messages[:i+1]
adds to rendering messages[:i] (so it carries the template's markers, and for the first message
whatever the template puts before it, e.g. a default system prompt); the generation prompt
("<|im_start|>assistant\\n") is a last, uncached segment. A template whose renderings are not
prefixes of each other (some strip earlier turns' reasoning) cannot be cut this way: it falls
back to one segment holding the whole rendering, which is still right, just not reusable.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from sparsex_jax.api import Request, Segment
from sparsex_jax.sampling import SamplingParams

MESSAGE_KEYS = ("role", "content", "cache")  # "cache": False keeps a message out of the caches


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Validates chat messages; returns them as plain dicts without our "cache" key."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise ValueError("messages must be a list of {\"role\": ..., \"content\": ...} objects")
  if not messages:
    raise ValueError("messages must not be empty")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ValueError(f"message {i} must be an object with role and content, got "
                       f"{type(m).__name__}")
    unknown = sorted(set(m) - set(MESSAGE_KEYS))
    if unknown:
      raise ValueError(f"message {i}: unknown field(s) {unknown}; a message has {MESSAGE_KEYS}")
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not role:
      raise ValueError(f"message {i}: role must be a non-empty string, got {role!r}")
    if not isinstance(content, str) or not content:
      raise ValueError(f"message {i} ({role}): content must be a non-empty string")
    if not isinstance(m.get("cache", True), bool):
      raise ValueError(f"message {i}: cache must be true or false, got {m['cache']!r}")
    out.append({"role": role, "content": content})
  return out


def chat_segments(tokenizer, messages: Sequence[Mapping[str, Any]],
                  add_generation_prompt: bool = True) -> list[Segment]:
  """One Segment per message (cache=False where the message says "cache": false), then the
  generation prompt as an uncached segment. See the module docstring for how it is cut."""
  if tokenizer is None:
    raise ValueError("chat messages need a tokenizer with a chat template (this engine has none: "
                     "give segments as token ids)")
  plain = check_messages(messages)
  cache = [bool(m.get("cache", True)) for m in messages]
  texts, done = [], ""
  for i in range(len(plain)):
    upto = tokenizer.apply_chat_template(plain[:i + 1], add_generation_prompt=False)
    if not upto.startswith(done) or len(upto) == len(done):
      return _whole(tokenizer, plain, add_generation_prompt)
    texts.append(upto[len(done):])
    done = upto
  segments = [Segment(t, cache=c) for t, c in zip(texts, cache)]
  if add_generation_prompt:
    full = tokenizer.apply_chat_template(plain, add_generation_prompt=True)
    if not full.startswith(done):
      return _whole(tokenizer, plain, add_generation_prompt)
    if len(full) > len(done):
      segments.append(Segment(full[len(done):], cache=False))
  return segments


def _whole(tokenizer, plain, add_generation_prompt) -> list[Segment]:
  text = tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt)
  return [Segment(text)]


def message_segments(tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[Segment]:
  """The segment each message is when it is not a conversation's first (for most templates, the
  same wherever it appears after the first): what to precompute so that a passage sent as a chat
  message is a segment-cache hit, e.g. `engine.cache_segments(message_segments(tok,
  [{"role": "user", "content": p} for p in passages]))`. Each is rendered after a placeholder
  system message, so no template default (such as SmolLM2's system prompt) lands in it."""
  out = []
  for m in messages:
    segs = chat_segments(tokenizer, [{"role": "system", "content": "-"}, m],
                         add_generation_prompt=False)
    if len(segs) != 2:
      raise ValueError("this chat template cannot be cut into one segment per message")
    out.append(segs[1])
  return out


def chat_request(tokenizer, messages: Sequence[Mapping[str, Any]], *, id=None,  # noqa: A002
                 sampling: SamplingParams | None = None,
                 add_generation_prompt: bool = True) -> Request:
  """A Request from chat messages ([{"role": "user", "content": "..."}, ...]), one segment per
  message, rendered with the tokenizer's chat template (Engine.chat_request passes the engine's)."""
  return Request(chat_segments(tokenizer, messages, add_generation_prompt), id=id,
                 sampling=sampling)
