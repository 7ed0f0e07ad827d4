"""The two input line formats of a batch job, parsed into requests.

One request per JSONL line, in either form (they may be mixed):
- ours: {"id": ..., "segments": [{"text": ...} | {"tokens": [...]}, ...] or "messages": [...],
  optional sampling overrides}; a segment may say "cache": false, so may a message;
- the OpenAI batch form that `vllm run-batch` reads: {"custom_id", "method": "POST",
  "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}, answered in its output form.

A line that cannot run is a LineError (a FailedLine once its line number is known), never the
job's failure; JobError is for what stops the whole job (an unreadable input or output file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from typing import Any, Sequence

from sparsex_jax.api import Request, Segment
from sparsex_jax.chat import chat_segments
from sparsex_jax.sampling import SamplingParams
from sparsex_jax.validation import is_int

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "stop_token_ids",
                 "ignore_eos")
NATIVE_KEYS = ("id", "segments", "messages", "namespace") + SAMPLING_KEYS
OPENAI_KEYS = ("custom_id", "method", "url", "body")
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
# Body fields we honour, and those we accept only at their no-op value (an existing batch file
# often spells them out); anything else is refused rather than silently ignored.
OPENAI_BODY = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "seed", "stop", "user")
OPENAI_NOOP = {"n": 1, "stream": False, "logprobs": False, "echo": False,
               "frequency_penalty": 0, "presence_penalty": 0}
# Limits on one input line: a line over them is a bad line, never the job's end (a deep nesting
# would otherwise exhaust Python's recursion in the JSON parser, a huge line the memory).
MAX_LINE_BYTES = 64 * 2**20
MAX_DEPTH = 32  # a request needs 5 levels (OpenAI chat: line, body, messages, message, part)


class JobError(Exception):
  """The job cannot start or go on (an unreadable input or output file): not a per-line error."""


class LineError(ValueError):
  """One input line that cannot run."""


def id_key(request_id) -> str:
  """Ids compare as their JSON text: 7 and "7" are different ids, as they are in the output."""
  return json.dumps(request_id, sort_keys=True)




@dataclasses.dataclass
class JobLine:
  """One request of the job, parsed."""

  line: int  # 1-based line number in the input file
  id: Any  # "id" (ours) or "custom_id" (OpenAI form), as written
  form: str  # "ours", "chat.completion" or "text_completion"
  request: Request
  stop: tuple[str, ...] = ()  # stop strings (applied to the decoded text)
  model: str | None = None  # the OpenAI body's model, echoed back

  @property
  def key(self) -> str:
    return id_key(self.id)


@dataclasses.dataclass(frozen=True)
class Defaults:
  """Job-wide sampling defaults (the CLI flags); per-line fields override them."""

  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  # The last message of an OpenAI chat line (usually the question) is not cached unless this is
  # set: it rarely recurs, and a request must not find its own question saved by a crashed run.
  cache_final_message: bool = False


def _unknown(obj: dict, allowed: Sequence[str], where: str) -> None:
  extra = sorted(set(obj) - set(allowed))
  if extra:
    raise LineError(f"unknown field(s) {extra} in {where}; allowed: {list(allowed)}")


def _seed_for(request_id, seed: int) -> int:
  """A request's default seed: from the job seed and its id, so its samples are the same whatever
  its batch, its place in the file, or whether the job was resumed."""
  h = hashlib.blake2b(f"{seed}:{id_key(request_id)}".encode(), digest_size=4)
  return int.from_bytes(h.digest(), "little")


def stop_strings(value) -> tuple[str, ...]:
  """An OpenAI `stop` field (a string, a list of strings or null) as a tuple of strings."""
  if value is None:
    return ()
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
    raise LineError(f"stop must be a non-empty string or a list of them, got {value!r}")
  return tuple(value)


def _sampling(fields: dict, defaults: Defaults, request_id, names: dict[str, str]
              ) -> SamplingParams:
  """SamplingParams from a line's fields (`names` maps our names to the line's spelling)."""
  def get(ours, default):
    return fields.get(names.get(ours, ours), default)

  kw = {"max_new_tokens": get("max_new_tokens", defaults.max_new_tokens),
        "temperature": get("temperature", defaults.temperature),
        "top_p": get("top_p", defaults.top_p),
        "seed": get("seed", _seed_for(request_id, defaults.seed))}
  if "stop_token_ids" in fields:
    kw["stop_token_ids"] = fields["stop_token_ids"]
    if not isinstance(kw["stop_token_ids"], list):
      raise LineError(f"stop_token_ids must be a list of ints, got {kw['stop_token_ids']!r}")
  if "ignore_eos" in fields:
    if not isinstance(fields["ignore_eos"], bool):
      raise LineError(f"ignore_eos must be true or false, got {fields['ignore_eos']!r}")
    kw["ignore_eos"] = fields["ignore_eos"]
  try:
    return SamplingParams(**kw)
  except ValueError as e:
    raise LineError(str(e)) from None


def _segment(item, i: int) -> Segment:
  if isinstance(item, str):
    item = {"text": item}
  if not isinstance(item, dict):
    raise LineError(f"segment {i} must be an object {{\"text\": ...}} or {{\"tokens\": [...]}}")
  _unknown(item, ("text", "tokens", "cache"), f"segment {i}")
  if ("text" in item) == ("tokens" in item):
    raise LineError(f"segment {i} needs exactly one of \"text\" and \"tokens\"")
  cache = item.get("cache", True)
  if not isinstance(cache, bool):
    raise LineError(f"segment {i}: cache must be true or false, got {cache!r}")
  content = item.get("text", item.get("tokens"))
  if "text" in item and not isinstance(content, str):
    raise LineError(f"segment {i}: text must be a string")
  if "tokens" in item and not (isinstance(content, list)
                               and all(is_int(t) and t >= 0 for t in content)):
    raise LineError(f"segment {i}: tokens must be a list of non-negative ints")
  if not content or (isinstance(content, str) and not content.strip()):
    raise LineError(f"segment {i} is empty")
  return Segment(content, cache=cache)


def openai_messages(messages) -> list[dict]:
  """OpenAI chat messages with content parts ([{"type": "text", "text": ...}]) joined to text."""
  if not isinstance(messages, list):
    raise LineError("body.messages must be a list")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise LineError(f"body.messages[{i}] must be an object")
    _unknown(m, ("role", "content", "name"), f"body.messages[{i}]")
    content = m.get("content")
    if isinstance(content, list):
      texts = []
      for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
          raise LineError(f"body.messages[{i}]: only text content parts are supported")
        texts.append(part.get("text", ""))
      content = "".join(texts)
    out.append({"role": m.get("role"), "content": content})
  return out


def json_depth(obj) -> int:
  """Nesting depth of parsed JSON (iterative: no recursion to exhaust)."""
  deepest, stack = 0, [(obj, 1)]
  while stack:
    item, d = stack.pop()
    if isinstance(item, (dict, list)):
      deepest = max(deepest, d)
      stack.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
  return deepest


def _load_json(text: str):
  """json.loads with the line limits; LineError for anything a line can do wrong."""
  if len(text) > MAX_LINE_BYTES:
    raise LineError(f"line of {len(text)} characters is over the limit of {MAX_LINE_BYTES}")
  try:
    obj = json.loads(text)
  except ValueError as e:
    msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
    raise LineError(f"not valid JSON ({msg})") from None
  except RecursionError:
    raise LineError(f"JSON nested deeper than the limit of {MAX_DEPTH}") from None
  except MemoryError:
    raise LineError("line too large to parse in memory") from None
  if json_depth(obj) > MAX_DEPTH:
    raise LineError(f"JSON nested deeper than the limit of {MAX_DEPTH}")
  return obj


def parse_line(text: str, line: int, tokenizer, defaults: Defaults) -> JobLine:
  """One input line as a JobLine; LineError (without the line number) when it cannot run."""
  obj = _load_json(text)
  if not isinstance(obj, dict):
    raise LineError(f"a request must be a JSON object, got {type(obj).__name__}")
  if "custom_id" in obj or "body" in obj:
    return _parse_openai(obj, line, tokenizer, defaults)
  _unknown(obj, NATIVE_KEYS, "the request")
  request_id = obj.get("id")
  if request_id is None:
    raise LineError("missing \"id\"")
  if not (isinstance(request_id, str) and request_id) and not is_int(request_id):
    raise LineError(f"id must be a non-empty string or an int, got {request_id!r}")
  if ("segments" in obj) == ("messages" in obj):
    raise LineError("a request needs exactly one of \"segments\" and \"messages\"")
  sampling = _sampling(obj, defaults, request_id, {})
  namespace = obj.get("namespace")
  if namespace is not None and not isinstance(namespace, str):
    raise LineError(f"namespace must be a string, got {namespace!r}")
  try:
    if "segments" in obj:
      if not isinstance(obj["segments"], list) or not obj["segments"]:
        raise LineError("segments must be a non-empty list")
      segments = [_segment(s, i) for i, s in enumerate(obj["segments"])]
    else:
      segments = chat_segments(tokenizer, obj["messages"])
    return JobLine(line, request_id, "ours",
                   Request(segments, id=request_id, sampling=sampling, namespace=namespace),
                   stop=stop_strings(obj.get("stop")))
  except (TypeError, ValueError) as e:
    raise LineError(str(e)) from None


def _parse_openai(obj: dict, line: int, tokenizer, defaults: Defaults) -> JobLine:
  _unknown(obj, OPENAI_KEYS, "the batch request")
  request_id = obj.get("custom_id")
  if not isinstance(request_id, str) or not request_id:
    raise LineError("missing \"custom_id\" (a non-empty string)")
  if obj.get("method", "POST") != "POST":
    raise LineError(f"method must be POST, got {obj.get('method')!r}")
  url = obj.get("url")
  if url not in OPENAI_URLS:
    raise LineError(f"url must be one of {list(OPENAI_URLS)}, got {url!r}")
  body = obj.get("body")
  if not isinstance(body, dict):
    raise LineError("body must be an object")
  body = {k: v for k, v in body.items() if v is not None}  # null means "the default", as in OpenAI
  _unknown(body, OPENAI_BODY + tuple(OPENAI_NOOP), "body")
  for name, noop in OPENAI_NOOP.items():
    if name in body and body[name] != noop:
      raise LineError(f"body.{name}={body[name]!r} is not supported (only {noop!r})")
  if "max_tokens" in body and "max_completion_tokens" in body:
    raise LineError("give one of body.max_tokens and body.max_completion_tokens")
  names = {"max_new_tokens": "max_completion_tokens" if "max_completion_tokens" in body
           else "max_tokens"}
  sampling = _sampling(body, defaults, request_id, names)
  try:
    if url == "/v1/chat/completions":
      if "prompt" in body or "messages" not in body:
        raise LineError("a chat completion body needs \"messages\" (and no \"prompt\")")
      segments, form = chat_segments(tokenizer, openai_messages(body["messages"])), \
          "chat.completion"
      if not defaults.cache_final_message:
        segments = _final_message_uncached(segments)
    else:
      if "messages" in body or "prompt" not in body:
        raise LineError("a completion body needs \"prompt\" (and no \"messages\")")
      prompt = body["prompt"]
      if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
      if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        segments = [_segment({"tokens": prompt}, 0)]
      elif isinstance(prompt, str):
        segments = [_segment({"text": prompt}, 0)]
      else:
        raise LineError("body.prompt must be one string or one list of token ids")
      form = "text_completion"
    model = body.get("model")
    return JobLine(line, request_id, form, Request(segments, id=request_id, sampling=sampling),
                   stop=stop_strings(body.get("stop")),
                   model=model if isinstance(model, str) else None)
  except (TypeError, ValueError) as e:
    raise LineError(str(e)) from None


def _final_message_uncached(segments: list[Segment]) -> list[Segment]:
  """The last message's segment (before the uncached generation prompt) marked cache=False."""
  last = len(segments) - 2 if len(segments) >= 2 and not segments[-1].cache else len(segments) - 1
  if last < 0 or not segments[last].cache:
    return segments
  out = list(segments)
  out[last] = Segment(segments[last].content, cache=False)
  return out


@dataclasses.dataclass
class FailedLine:
  line: int
  id: Any
  error: str


def read_requests(path: str, tokenizer, defaults: Defaults = Defaults()
                  ) -> tuple[list[JobLine], list[FailedLine]]:
  """Every request of a JSONL file, and the lines that cannot run (blank lines are skipped).

  A repeated id is an error on every line after its first; the first still runs.
  """
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise JobError(f"{path}: cannot read ({e.strerror})") from None
  lines, failed, seen = [], [], {}
  if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one)
    raw = raw[3:]
  for n, data in enumerate(raw.split(b"\n"), start=1):
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      failed.append(FailedLine(n, None, f"not UTF-8 ({e.reason} at byte {e.start})"))
      continue
    if not text.strip():
      continue
    try:
      job = parse_line(text, n, tokenizer, defaults)
    except LineError as e:
      failed.append(FailedLine(n, _guess_id(text), str(e)))
      continue
    except (Exception, RecursionError, MemoryError) as e:  # pylint: disable=broad-except
      # Whatever one line does (a tokenizer or template failure included) is that line's error.
      failed.append(FailedLine(n, _guess_id(text), f"cannot parse ({type(e).__name__}: {e})"))
      continue
    if job.key in seen:
      failed.append(FailedLine(n, job.id, f"duplicate id {job.id!r} (first on line "
                                          f"{seen[job.key]})"))
      continue
    seen[job.key] = n
    lines.append(job)
  return lines, failed


def _guess_id(text: str):
  """The id of a line that failed to parse, when it can still be read (for the errors file)."""
  with contextlib.suppress(LineError, AttributeError):
    obj = _load_json(text)
    request_id = obj.get("custom_id", obj.get("id"))
    if isinstance(request_id, (str, int)):
      return request_id
  return None
