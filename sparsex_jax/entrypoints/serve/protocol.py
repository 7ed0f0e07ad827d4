"""The OpenAI request bodies `sparsex serve` takes, parsed and checked into typed requests.

Every field is either honoured, accepted only at its no-op value (`n: 1`, `logprobs: false`, ...),
or refused with a 400 that names it (`ApiError.param`): an option is never silently ignored. The
message and body checks are the batch job's (sparsex_jax/batch/formats.py), so a body that a
batch line accepts is accepted here and refused with the same words.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from sparsex_jax.api import Request, Segment
from sparsex_jax.batch.formats import LineError, openai_messages, stop_strings
from sparsex_jax.chat import chat_segments
from sparsex_jax.reuse import ReuseConfig, ReuseMethod
from sparsex_jax.sampling import SamplingParams
from sparsex_jax.validation import is_int

COMMON = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
          "stream_options", "user", "reuse")
CHAT_FIELDS = COMMON + ("messages", "max_completion_tokens")
COMPLETION_FIELDS = COMMON + ("prompt",)
# Accepted only at the value that changes nothing (clients often spell them out).
NOOP = {"n": 1, "logprobs": False, "echo": False, "frequency_penalty": 0, "presence_penalty": 0}


class ApiError(Exception):
  """An error answered to one request: HTTP status, message, and the field at fault."""

  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error", headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.status}}


def bad(param: str | None, message: str) -> ApiError:
  return ApiError(400, message, param)


@dataclasses.dataclass
class ParsedRequest:
  """One completion request, checked: what the engine loop runs and how to answer it."""

  kind: str  # "chat.completion" or "text_completion"
  model: str
  request: Request  # segments (one per chat message), sampling, namespace
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool
  reuse: ReuseMethod | None  # None: the server's method
  max_tokens_field: str | None  # the field that gave max_tokens (None: the server's default)


def _number(body: dict, name: str, default):
  value = body.get(name, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise bad(name, f"{name} must be a number, got {value!r}")
  return value


def parse_reuse(value) -> ReuseMethod:
  """The per-request reuse method: a mode name, or {"mode": ..., its fields}."""
  if isinstance(value, str):
    value = {"mode": value}
  if not isinstance(value, dict) or not isinstance(value.get("mode"), str):
    raise bad("reuse", "reuse must be a mode name or an object {\"mode\": ..., fields}")
  fields = {k: v for k, v in value.items() if k != "mode"}
  try:
    return ReuseConfig(value["mode"], **fields)
  except (TypeError, ValueError) as e:
    raise bad("reuse", f"reuse: {e}") from None


def parse_body(body: Any, kind: str, tokenizer, *, default_max_tokens: int) -> ParsedRequest:
  """A chat (kind "chat.completion") or completion ("text_completion") body as a ParsedRequest;
  ApiError(400) naming the field otherwise."""
  if not isinstance(body, dict):
    raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
  body = {k: v for k, v in body.items() if v is not None}  # null means "the default"
  allowed = CHAT_FIELDS if kind == "chat.completion" else COMPLETION_FIELDS
  for name in sorted(body):
    if name in NOOP:
      if body[name] != NOOP[name] or isinstance(body[name], bool) != isinstance(NOOP[name], bool):
        raise bad(name, f"{name}={body[name]!r} is not supported (only {NOOP[name]!r})")
      continue
    if name not in allowed:
      raise bad(name, f"unsupported field {name!r}; supported: {sorted(allowed)}")
  model = body.get("model")
  if not isinstance(model, str) or not model:
    raise bad("model", "model must be a non-empty string")
  if "max_tokens" in body and "max_completion_tokens" in body:
    raise bad("max_tokens", "give one of max_tokens and max_completion_tokens")
  mt_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
  max_tokens = body.get(mt_name, default_max_tokens)
  if not is_int(max_tokens) or max_tokens < 1:
    raise bad(mt_name, f"{mt_name} must be an integer >= 1, got {max_tokens!r}")
  temperature = _number(body, "temperature", 1.0)  # OpenAI's default
  top_p = _number(body, "top_p", 1.0)
  seed = body.get("seed", secrets.randbits(32))
  if not is_int(seed):
    raise bad("seed", f"seed must be an integer, got {seed!r}")
  seed = int(seed) % 2**32
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise bad("stream", f"stream must be true or false, got {stream!r}")
  options = body.get("stream_options", {})
  if not isinstance(options, dict) or set(options) - {"include_usage"}:
    raise bad("stream_options", "stream_options takes only include_usage")
  include_usage = options.get("include_usage", False)
  if not isinstance(include_usage, bool):
    raise bad("stream_options", "stream_options.include_usage must be true or false")
  if "user" in body and not isinstance(body["user"], str):
    raise bad("user", "user must be a string")
  try:
    stop = stop_strings(body.get("stop"))
  except LineError as e:
    raise bad("stop", str(e)) from None
  reuse = parse_reuse(body["reuse"]) if "reuse" in body else None
  for name, value, check in (("temperature", temperature, lambda v: v >= 0),
                             ("top_p", top_p, lambda v: 0 < v <= 1)):
    if not check(value):
      raise bad(name, f"{name} out of range: {value!r}")
  sampling = SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature),
                            top_p=float(top_p), seed=seed)
  if kind == "chat.completion":
    if "messages" not in body:
      raise bad("messages", "a chat completion needs messages")
    try:
      messages = openai_messages(body["messages"])
      segments = chat_segments(tokenizer, messages)
    except (LineError, ValueError, TypeError) as e:
      raise bad("messages", str(e).replace("body.", "")) from None
  else:
    if "prompt" not in body:
      raise bad("prompt", "a completion needs a prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
      prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str) and prompt:
      if tokenizer is None:
        raise bad("prompt", "this model has no tokenizer: give the prompt as token ids")
      segments = [Segment(prompt)]
    elif (isinstance(prompt, list) and prompt
          and all(is_int(t) and not isinstance(t, bool) and t >= 0 for t in prompt)):
      segments = [Segment(prompt)]
    else:
      raise bad("prompt", "prompt must be a non-empty string or a list of token ids (one prompt: "
                          "n > 1 and prompt batches are not supported)")
  return ParsedRequest(kind, model, Request(segments, sampling=sampling), stop, stream,
                       include_usage, reuse, mt_name if mt_name in body else None)
