"""Offline batch jobs over JSONL: parse the requests file, plan the job so shared segments are
computed once, run it in batches, and write one result line per request, resumably.

Input, one request per line, in either form (they may be mixed):
- ours: {"id": ..., "segments": [{"text": ...} | {"tokens": [...]}, ...] or "messages": [...],
  optional sampling overrides}; a segment may say "cache": false, so may a message;
- the OpenAI batch form that `vllm run-batch` reads: {"custom_id", "method": "POST",
  "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}, answered in its output form.

Resumability: a result line is written whole and flushed as soon as its request is done; a rerun
with the same output skips the ids already there. A torn last line (a crash mid-write) is cut off
and its request redone. A line that fails (bad input, too long, a failure while it ran) is reported
with its line number on stderr and in the errors file beside the output, and is not written to the
output, so a rerun after fixing it runs it. Ctrl-C or SIGTERM stops after the current batch (a
second one stops at once); no finished result is lost and no line is left half-written.

The CLI (`sparsex generate`) is a thin layer over `run_job`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import time
import uuid
from typing import Any, Callable, Sequence


from sparsex_jax.api import Request, RequestOutput, Segment
from sparsex_jax.chat import chat_segments
from sparsex_jax.kv.segment_cache import segment_key
from sparsex_jax.reuse import ReuseConfig, ReuseMethod
from sparsex_jax.sampling import SamplingParams
from sparsex_jax.validation import is_int

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "stop_token_ids",
                 "ignore_eos")
NATIVE_KEYS = ("id", "segments", "messages") + SAMPLING_KEYS
OPENAI_KEYS = ("custom_id", "method", "url", "body")
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
# Body fields we honour, and those we accept only at their no-op value (an existing batch file
# often spells them out); anything else is refused rather than silently ignored.
OPENAI_BODY = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "seed", "stop", "user")
OPENAI_NOOP = {"n": 1, "stream": False, "logprobs": False, "echo": False,
               "frequency_penalty": 0, "presence_penalty": 0}
SHARED = ("alone", "context", "off")
# A job hands the engine this many batches of requests at a time: within a window the running
# batch refills as requests finish (continuous batching), and each result is written as its
# request finishes. A graceful stop (SIGINT/SIGTERM) waits for the current window.
WINDOW_BATCHES = 4


class JobError(Exception):
  """The job cannot start or go on (an unreadable input or output file): not a per-line error."""


class LineError(ValueError):
  """One input line that cannot run."""


def _id_key(request_id) -> str:
  """Ids compare as their JSON text: 7 and "7" are different ids, as they are in the output."""
  return json.dumps(request_id, sort_keys=True)


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------

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
    return _id_key(self.id)


@dataclasses.dataclass(frozen=True)
class Defaults:
  """Job-wide sampling defaults (the CLI flags); per-line fields override them."""

  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0


def _unknown(obj: dict, allowed: Sequence[str], where: str) -> None:
  extra = sorted(set(obj) - set(allowed))
  if extra:
    raise LineError(f"unknown field(s) {extra} in {where}; allowed: {list(allowed)}")


def _seed_for(request_id, seed: int) -> int:
  """A request's default seed: from the job seed and its id, so its samples are the same whatever
  its batch, its place in the file, or whether the job was resumed."""
  h = hashlib.blake2b(f"{seed}:{_id_key(request_id)}".encode(), digest_size=4)
  return int.from_bytes(h.digest(), "little")


def _stop_strings(value) -> tuple[str, ...]:
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


def _openai_messages(messages) -> list[dict]:
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


def parse_line(text: str, line: int, tokenizer, defaults: Defaults) -> JobLine:
  """One input line as a JobLine; LineError (without the line number) when it cannot run."""
  try:
    obj = json.loads(text)
  except ValueError as e:
    raise LineError(f"not valid JSON ({e.msg} at column {e.colno})") from None
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
  try:
    if "segments" in obj:
      if not isinstance(obj["segments"], list) or not obj["segments"]:
        raise LineError("segments must be a non-empty list")
      segments = [_segment(s, i) for i, s in enumerate(obj["segments"])]
    else:
      segments = chat_segments(tokenizer, obj["messages"])
    return JobLine(line, request_id, "ours", Request(segments, id=request_id, sampling=sampling),
                   stop=_stop_strings(obj.get("stop")))
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
      segments, form = chat_segments(tokenizer, _openai_messages(body["messages"])), \
          "chat.completion"
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
                   stop=_stop_strings(body.get("stop")),
                   model=model if isinstance(model, str) else None)
  except (TypeError, ValueError) as e:
    raise LineError(str(e)) from None


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
    if job.key in seen:
      failed.append(FailedLine(n, job.id, f"duplicate id {job.id!r} (first on line "
                                          f"{seen[job.key]})"))
      continue
    seen[job.key] = n
    lines.append(job)
  return lines, failed


def _guess_id(text: str):
  """The id of a line that failed to parse, when it can still be read (for the errors file)."""
  with contextlib.suppress(ValueError, AttributeError):
    obj = json.loads(text)
    return obj.get("custom_id", obj.get("id"))
  return None


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

class Critical:
  """Defers SIGINT/SIGTERM while a result line is written: a line is written whole or not."""

  def __init__(self):
    self.depth = 0
    self.pending: Callable[[], None] | None = None

  @contextlib.contextmanager
  def section(self):
    self.depth += 1
    try:
      yield
    finally:
      self.depth -= 1
      if self.depth == 0 and self.pending is not None:
        pending, self.pending = self.pending, None
        pending()


class ResultWriter:
  """The output JSONL: reads the ids already done, cuts a torn last line, appends flushed lines."""

  def __init__(self, path: str, critical: Critical | None = None):
    self.path, self.critical = path, critical or Critical()
    self.done: set[str] = set()
    self.torn = False  # a torn last line was found and cut
    if os.path.exists(path):
      self._scan()
    try:
      self._f = open(path, "ab")  # noqa: SIM115  (closed by close())
    except OSError as e:
      raise JobError(f"{path}: cannot write ({e.strerror})") from None

  def _scan(self) -> None:
    with open(self.path, "rb") as f:
      data = f.read()
    # Every line we write ends with "\n" and is written in one call: bytes after the last newline
    # are a write a crash cut short (even if they parse), so they are cut and that request redone.
    *complete, tail = data.split(b"\n")
    good = 0
    for n, part in enumerate(complete, start=1):
      if part.strip():
        try:
          rec = json.loads(part.decode("utf-8"))
          if not isinstance(rec, dict):
            raise ValueError
        except ValueError:
          raise JobError(f"{self.path}:{n}: not a JSON result line (edited by hand?); fix or "
                         f"remove it, then rerun") from None
        self.done.add(_id_key(rec["custom_id"] if "custom_id" in rec else rec.get("id")))
      good += len(part) + 1
    if tail:
      self.torn = True
      with open(self.path, "r+b") as f:
        f.truncate(good)

  def write(self, record: dict) -> None:
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with self.critical.section():
      self._f.write(data)
      self._f.flush()

  def close(self) -> None:
    with self.critical.section():
      with contextlib.suppress(OSError):
        os.fsync(self._f.fileno())
      self._f.close()


def errors_path_for(output: str) -> str:
  """The errors file beside an output: results.jsonl -> results.errors.jsonl."""
  base, ext = os.path.splitext(output)
  return f"{base}.errors{ext or '.jsonl'}"


def apply_stop_strings(text: str, tokens: list[int], stops: Sequence[str], decode
                       ) -> tuple[str, list[int], bool]:
  """Cuts `text` before the first stop string and `tokens` after the token that completed it."""
  cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
  if cut < 0:
    return text, tokens, False
  for n in range(1, len(tokens) + 1):
    if any(s in decode(tokens[:n]) for s in stops):
      tokens = tokens[:n]
      break
  return text[:cut], tokens, True


def result_record(job: JobLine, out: RequestOutput, reuse: dict, decode, model: str) -> dict:
  """The output line of a finished request, in the form of its input."""
  text, tokens, reason = out.text, list(out.token_ids), out.finish_reason
  if job.stop:
    text, tokens, stopped = apply_stop_strings(text, tokens, job.stop, decode)
    reason = "stop" if stopped else reason
  s = out.stats
  stats = {"ttft_s": round(s.ttft_s, 6), "n_prompt": s.n_prompt, "n_exact": s.n_exact,
           "n_reused": s.n_reused, "n_new": s.n_new, "n_recomputed": s.n_recomputed,
           "n_generated": s.n_generated}
  if job.form == "ours":
    return {"id": job.id, "text": text, "token_ids": tokens, "finish_reason": reason,
            "stats": stats, "reuse": reuse}
  created = int(time.time())
  if job.form == "chat.completion":
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "logprobs": None, "finish_reason": reason}
  else:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
  body = {"id": f"{'chatcmpl' if job.form == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
          "object": job.form, "created": created, "model": job.model or model,
          "choices": [choice],
          "usage": {"prompt_tokens": s.n_prompt, "completion_tokens": len(tokens),
                    "total_tokens": s.n_prompt + len(tokens)}}
  return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": job.id,
          "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body},
          "error": None, "sparsex": {"token_ids": tokens, "stats": stats, "reuse": reuse}}


# ------------------------------------------------------------------------------------------------
# Planning: shared segments computed once
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class JobPlan:
  """The order a job runs in: `steps` are lists of indices into the job's lines, each run in
  batches after the previous one; `warm` is the set of shared segment keys that are computed alone
  just before the first batch that needs them (empty unless shared="alone")."""

  steps: list[list[int]]
  warm: set[str]


def plan_job(keys: Sequence[list[str]], batch_size: int, shared: str, reads_segments: bool,
             cached: Callable[[str], bool], count: dict[str, int] | None = None) -> JobPlan:
  """Orders a job so that requests sharing a segment run together and the segment is computed
  once, in the spirit of BatchLLM's global prefix sharing.

  keys[i]: the cacheable segment keys of request i; count: in how many requests of the whole job
  each key appears (default: counted over `keys`); a key in two or more is shared. Requests
  linked by shared segments form a component (union-find); components run in the order of their
  first request. Inside a component, requests are grouped by their most specific shared segment
  (the one in the fewest requests: the passage rather than the system prompt everyone has), so a
  passage's requests are adjacent and it need stay in the pool only while they run.
  - shared="alone" (with a mode that reads the segment cache): one step in that order; the runner
    computes a batch's shared segments alone at position 0 just before the batch, unless cached
    (so one evicted under pool pressure is computed again, identically). Every request sees the
    same cached KV whatever its batch or order: results do not depend on the batch size or on
    resuming.
  - shared="context": a segment is computed in context by the first request that has it (a
    "leader"); leaders run in rounds before the other requests, each after any earlier leader it
    shares a segment with, so no segment is computed twice. Components are packed into blocks of
    at least `batch_size` requests, each planned this way. Also what the prefix cache needs.
  - shared="off": input order.
  """
  n = len(keys)
  if shared == "off" or n == 0:
    return JobPlan([list(range(n))] if n else [], set())
  if count is None:
    count = {}
    for ks in keys:
      for k in set(ks):
        count[k] = count.get(k, 0) + 1
  shared_keys = {k for k, c in count.items() if c > 1}
  parent = list(range(n))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  first_with: dict[str, int] = {}
  for i, ks in enumerate(keys):
    for k in ks:
      if k in shared_keys:
        if k in first_with:
          parent[find(i)] = find(first_with[k])
        else:
          first_with[k] = i
  components: dict[int, list[int]] = {}
  for i in range(n):
    components.setdefault(find(i), []).append(i)  # in input order; dicts keep first-line order

  def group(i):  # the first request of i's most specific shared segment
    mine = [k for k in keys[i] if k in shared_keys]
    return min(((count[k], first_with[k]) for k in mine), default=(0, i))[1]

  ordered = [sorted(comp, key=group) for comp in components.values()]  # stable: input order
  if shared == "alone" and reads_segments:
    return JobPlan([[i for comp in ordered for i in comp]], shared_keys)

  blocks, block = [], []
  for comp in ordered:
    block.extend(comp)
    if len(block) >= batch_size:
      blocks.append(block)
      block = []
  if block:
    blocks.append(block)
  steps = []
  for block in blocks:
    claimed: dict[str, int] = {}  # segment -> round of the leader computing it
    rounds: dict[int, list[int]] = {}
    rest = []
    for i in block:
      mine = [k for k in keys[i] if k in shared_keys and not cached(k)]
      new = [k for k in mine if k not in claimed]
      if not new:
        rest.append(i)
        continue
      r = 1 + max((claimed[k] for k in mine if k in claimed), default=0)
      for k in new:
        claimed[k] = r
      rounds.setdefault(r, []).append(i)
    steps.extend(rounds[r] for r in sorted(rounds))
    if rest:
      steps.append(rest)
  return JobPlan(steps, set())


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
  """What a job did (also printed by the CLI)."""

  lines: int = 0  # requests in the input (valid or not)
  skipped: int = 0  # already in the output
  done: int = 0  # written this run
  failed: int = 0  # reported in the errors file
  interrupted: bool = False
  torn_line_redone: bool = False
  seconds: float = 0.0
  n_prompt: int = 0
  n_exact: int = 0
  n_reused: int = 0
  n_new: int = 0
  n_recomputed: int = 0
  n_generated: int = 0
  n_precomputed: int = 0  # tokens of shared segments computed alone before their requests
  token_layers: int = 0  # prefill work done: tokens x layers they were computed through
  token_layers_no_reuse: int = 0  # the same job with full prefill: n_prompt x layers
  segments_loaded: int = 0  # from the disk cache
  segments_saved: int = 0  # to the disk cache
  errors_file: str | None = None

  @property
  def hit_rate(self) -> float:
    """Prompt tokens whose KV came from a cache (exact prefix or segment)."""
    return (self.n_exact + self.n_reused) / self.n_prompt if self.n_prompt else 0.0

  @property
  def compute_fraction(self) -> float:
    return self.token_layers / self.token_layers_no_reuse if self.token_layers_no_reuse else 0.0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self) | {"hit_rate": round(self.hit_rate, 4),
                                       "compute_fraction": round(self.compute_fraction, 4)}

  def text(self) -> str:
    rate = self.done / self.seconds if self.seconds else 0.0
    tok = self.n_generated / self.seconds if self.seconds else 0.0
    stopped = " - interrupted: rerun the same command to resume" if self.interrupted else ""
    lines = [
        f"requests: {self.done} done, {self.failed} failed, {self.skipped} already in the output "
        f"(of {self.lines}){stopped}",
        f"time: {self.seconds:.1f} s, {rate:.2f} requests/s, {tok:.1f} generated tokens/s",
        f"prompt tokens: {self.n_prompt}: exact prefix hits {self.n_exact}, reused {self.n_reused} "
        f"(recomputed {self.n_recomputed}), computed new {self.n_new}; cache hit rate "
        f"{self.hit_rate:.1%}",
        f"prefill work: {self.token_layers} token-layers (shared segments computed alone: "
        f"{self.n_precomputed} tokens) vs {self.token_layers_no_reuse} without reuse = "
        f"{self.compute_fraction:.1%}"]
    if self.segments_loaded or self.segments_saved:
      lines.append(f"segment cache on disk: {self.segments_loaded} loaded, "
                   f"{self.segments_saved} saved")
    if self.torn_line_redone:
      lines.append("the output's last line was torn (an earlier crash): it was cut and redone")
    if self.errors_file:
      lines.append(f"errors: {self.errors_file}")
    return "\n".join(lines)


class _Signals:
  """First SIGINT/SIGTERM: stop after the current batch. Second: stop now (after the line being
  written, if any). Installed only in the main thread."""

  def __init__(self, critical: Critical, log):
    self.critical, self.log = critical, log
    self.stop = 0  # the signal number that asked to stop
    self._old = {}

  def __enter__(self):
    import threading
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def _handle(self, signum, frame):
    if self.stop:
      def abort():
        raise KeyboardInterrupt
      if self.critical.depth:
        self.critical.pending = abort
        return
      abort()
    self.stop = signum
    self.log(f"{signal.Signals(signum).name}: finishing the current batch, then stopping "
             f"(again to stop now; finished results are kept either way)")


def _cause(error: str) -> str:
  """A RequestOutput's error without the engine's "request i (id ...): " (the runner names the
  line instead)."""
  return re.sub(r"^request \d+( \(id .*?\))?: ", "", error or "", count=1)


def run_job(engine, input_path: str, output_path: str, *,
            reuse: ReuseMethod = ReuseConfig(), defaults: Defaults = Defaults(),
            batch_size: int = 16, shared: str = "alone", errors_path: str | None = None,
            progress: bool = True, model_name: str | None = None, log=None) -> Summary:
  """Runs a JSONL job with `engine`; see the module docstring. Returns the Summary (its
  `interrupted` and `failed` say how it ended); raises JobError when the files cannot be used."""
  if shared not in SHARED:
    raise ValueError(f"shared must be one of {SHARED}, got {shared!r}")
  if not is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  if os.path.exists(input_path) and os.path.exists(output_path) and \
      os.path.samefile(input_path, output_path):
    raise JobError(f"{output_path}: the output is the input file; give another --output")
  start = time.perf_counter()
  cfg = engine.config
  policy = reuse.resolve(cfg)
  reuse_record = {"mode": reuse.mode, "recompute_ratio": reuse.ratio,
                  "layer_threshold": policy.layer_threshold}
  model_name = model_name or cfg.name
  tok = engine.tokenizer
  decode = tok.decode if tok is not None else (lambda ids: "")
  summary = Summary()
  critical = Critical()

  bar = None

  def say(msg: str) -> None:
    if log is not None:
      log(msg)
    elif bar is not None:
      bar.write(msg, file=sys.stderr)
    else:
      print(msg, file=sys.stderr, flush=True)

  disk = engine.disk_cache
  loaded0, saved0 = (disk.loaded, disk.saved) if disk is not None else (0, 0)
  lines, failed = read_requests(input_path, tok, defaults)
  summary.lines = len(lines) + len(failed)
  writer = ResultWriter(output_path, critical)
  summary.torn_line_redone = writer.torn
  errors_path = errors_path or errors_path_for(output_path)
  with contextlib.suppress(FileNotFoundError):
    os.unlink(errors_path)  # the errors file describes the latest run only
  errors_file = None

  def fail(line: int, request_id, error: str) -> None:
    nonlocal errors_file
    summary.failed += 1
    summary.errors_file = errors_path
    say(f"{input_path}:{line}: " + (f"id {request_id!r}: " if request_id is not None else "")
        + error)
    if errors_file is None:
      errors_file = open(errors_path, "a", encoding="utf-8")  # noqa: SIM115
    with critical.section():
      errors_file.write(json.dumps({"line": line, "id": request_id, "error": error},
                                   ensure_ascii=False) + "\n")
      errors_file.flush()

  try:
    for f in failed:
      fail(f.line, f.id, f.error)
    summary.skipped = sum(1 for j in lines if j.key in writer.done)

    # Tokenize once, check lengths before any device work, and find the shared segments. Lines
    # already done count too: a segment a remaining request shares only with them is still
    # computed alone, so a resumed job gives the results an uninterrupted one would.
    runnable, keys, segments, count = [], [], {}, {}
    for job in lines:
      try:
        prompt = engine.tokenize(job.request,
                                 (job.request.sampling or SamplingParams()).max_new_tokens)
      except (ValueError, TypeError) as e:
        if job.key not in writer.done:
          fail(job.line, job.id, str(e))
        continue
      ks = []
      for ids, cacheable in zip(prompt.segments, prompt.cacheable):
        if cacheable:
          k = segment_key(ids)
          segments.setdefault(k, ids)
          ks.append(k)
      for k in set(ks):
        count[k] = count.get(k, 0) + 1
      if job.key not in writer.done:
        runnable.append(job)
        keys.append(ks)
    def cached(k):
      return engine.store.contains_segment(segments[k]) or (disk is not None and k in disk)

    plan = plan_job(keys, batch_size, shared, policy.reads_segment_cache, cached, count)

    L = cfg.n_layers
    bar = _progress(len(runnable), progress)
    with _Signals(critical, say) as signals:
      for step in plan.steps:
        if signals.stop:
          break
        window = batch_size * WINDOW_BATCHES
        for i in range(0, len(step), window):
          if signals.stop:
            break
          chunk = [runnable[j] for j in step[i:i + window]]
          # The window's shared segments, computed alone first (checked now, not when planning:
          # one evicted since is computed again, identically).
          warm = [segments[k] for k in dict.fromkeys(k for j in step[i:i + window]
                                                     for k in keys[j])
                  if k in plan.warm and not cached(k)]
          if warm:
            engine.cache_segments(warm, batch_size=batch_size)
            n = int(sum(len(w) for w in warm))
            summary.n_precomputed += n
            summary.token_layers += n * L

          def finished(index, out, chunk=chunk):  # written as each request finishes
            job = chunk[index]
            if out.error is not None:
              fail(job.line, job.id, _cause(out.error))
            else:
              writer.write(result_record(job, out, reuse_record, decode, model_name))
              _account(summary, out, L)
            if bar is not None:
              bar.update(1)
              el = time.perf_counter() - start
              bar.set_postfix_str(f"{summary.n_generated / el:.1f} tok/s, "
                                  f"hit {summary.hit_rate:.0%}", refresh=False)

          engine.generate([j.request for j in chunk], reuse=reuse, on_error="return",
                          on_output=finished)
      summary.interrupted = bool(signals.stop)
  except KeyboardInterrupt:
    summary.interrupted = True
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    if errors_file is not None:
      errors_file.close()
    if disk is not None:
      summary.segments_loaded, summary.segments_saved = disk.loaded - loaded0, disk.saved - saved0
    summary.seconds = time.perf_counter() - start
  return summary


def _account(summary: Summary, out: RequestOutput, n_layers: int) -> None:
  s = out.stats
  summary.done += 1
  summary.n_prompt += s.n_prompt
  summary.n_exact += s.n_exact
  summary.n_reused += s.n_reused
  summary.n_new += s.n_new
  summary.n_recomputed += s.n_recomputed
  summary.n_generated += s.n_generated
  summary.token_layers_no_reuse += s.n_prompt * n_layers
  if s.n_reused == 0:
    summary.token_layers += s.n_new * n_layers
  else:  # full layers [0, T) for every non-exact token, then only the active ones
    t = min(out.prefill.layer_threshold if out.prefill is not None else n_layers, n_layers)
    summary.token_layers += (s.n_new + s.n_reused) * t + (s.n_new + s.n_recomputed) * (n_layers - t)


def _progress(total: int, enabled: bool):
  if not enabled or total == 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
