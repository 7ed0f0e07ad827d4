"""The OpenAI-compatible ASGI app of `sparsex serve` (Starlette), over one EngineLoop.

  POST /v1/chat/completions, /v1/completions   (stream: server-sent events)
  GET  /v1/models, /health, /metrics

Docs: docs/SERVING.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import time
import uuid

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sparsex_jax.api import RequestOutput
from sparsex_jax.batch.formats import MAX_DEPTH, json_depth
from sparsex_jax.entrypoints.serve.engine_loop import EngineLoop, Finished, Full, Handle, Tokens
from sparsex_jax.entrypoints.serve.metrics import Metrics
from sparsex_jax.entrypoints.serve.protocol import ApiError, ParsedRequest, bad, parse_body
from sparsex_jax.reuse import ReuseMethod

MAX_BODY_BYTES = 32 * 2**20


@dataclasses.dataclass
class ServeConfig:
  model_name: str
  reuse: ReuseMethod
  default_max_tokens: int = 256
  max_waiting: int = 64
  request_timeout: float | None = None  # seconds, per request (None: none)
  namespace_per_key: bool = False  # each API key (Authorization: Bearer) its own namespace
  retry_after: int = 1  # seconds, in a 429's Retry-After


def key_namespace(key: str) -> str:
  """The cache namespace of an API key (a digest: the key itself is kept nowhere)."""
  return "key-" + hashlib.sha256(key.encode()).hexdigest()[:32]


class Server:
  """The app's state: the engine, its loop, the config, the metrics."""

  def __init__(self, engine, config: ServeConfig, on_shutdown=None):
    self.engine, self.config, self.on_shutdown = engine, config, on_shutdown
    self.metrics = Metrics()
    self.loop = EngineLoop(engine, config.reuse, max_waiting=config.max_waiting,
                           on_first_token=self._first_token, on_finished=self._finished)
    self.draining = False

  # ---- metrics hooks (engine thread) ---------------------------------------------------------

  def _first_token(self, handle: Handle) -> None:
    self.metrics.ttft.observe(handle.t_first - handle.t_arrival)

  def _finished(self, handle: Handle, output: RequestOutput) -> None:
    now, t1 = time.perf_counter(), handle.t_first
    if output.error is not None:
      return
    s = output.stats
    self.metrics.prompt_tokens.inc(s.n_prompt)
    self.metrics.generation_tokens.inc(len(output.token_ids))
    self.metrics.reused_tokens.inc(s.n_reused)
    self.metrics.exact_tokens.inc(s.n_exact)
    self.metrics.continued_tokens.inc(s.n_continued)
    self.metrics.recomputed_tokens.inc(s.n_recomputed)
    if t1 is not None and len(output.token_ids) > 1:
      self.metrics.tpot.observe((now - t1) / (len(output.token_ids) - 1))

  # ---- the app -------------------------------------------------------------------------------

  def app(self) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
      self.loop.start()
      try:
        yield
      finally:  # SIGTERM (uvicorn stopped taking requests and let open ones finish): drain
        self.draining = True
        await asyncio.to_thread(self.loop.stop)
        if self.on_shutdown is not None:
          await asyncio.to_thread(self.on_shutdown)

    routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
              Route("/v1/completions", self.completions, methods=["POST"]),
              Route("/v1/models", self.models, methods=["GET"]),
              Route("/health", self.health, methods=["GET"]),
              Route("/metrics", self.prometheus, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)

  async def health(self, _request):
    if not self.loop.alive:
      return JSONResponse({"status": "engine loop stopped"}, status_code=503)
    return JSONResponse({"status": "draining" if self.draining else "ok"})

  async def models(self, _request):
    return JSONResponse({"object": "list", "data": [
        {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "sparsex"}]})

  async def prometheus(self, _request):
    self.metrics.refresh(self.loop, self.engine)
    return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

  async def chat(self, request):
    return await self._complete(request, "chat.completion", "/v1/chat/completions")

  async def completions(self, request):
    return await self._complete(request, "text_completion", "/v1/completions")

  # ---- one completion ------------------------------------------------------------------------

  def _error(self, endpoint: str, e: ApiError) -> JSONResponse:
    self.metrics.requests.labels(endpoint, str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

  def namespace(self, request: HttpRequest) -> str:
    if not self.config.namespace_per_key:
      return self.engine.namespace
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if not key:
      raise ApiError(401, "an API key is required (Authorization: Bearer KEY): this server gives "
                          "each key its own cache namespace", None, "authentication_error")
    return key_namespace(key)

  async def _parse(self, request: HttpRequest, kind: str) -> tuple[ParsedRequest, Handle]:
    if self.draining:
      raise ApiError(503, "the server is shutting down", None, "server_error")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
      raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
      body = json.loads(raw)
    except (ValueError, RecursionError) as e:
      raise bad(None, f"malformed JSON body ({e})") from None
    if json_depth(body) > MAX_DEPTH:
      raise bad(None, f"JSON nested deeper than {MAX_DEPTH}")
    namespace = self.namespace(request)
    parsed = parse_body(body, kind, self.engine.tokenizer,
                        default_max_tokens=self.config.default_max_tokens)
    if parsed.model != self.config.model_name:
      raise ApiError(404, f"model {parsed.model!r} does not exist (this server has "
                          f"{self.config.model_name!r})", "model", "not_found_error")
    req = dataclasses.replace(parsed.request, namespace=namespace, id=uuid.uuid4().hex)
    sp = req.sampling
    where = "messages" if kind == "chat.completion" else "prompt"
    try:
      prompt = self.engine.tokenize(req, 0)
    except (ValueError, TypeError) as e:
      raise bad(where, f"{where}: {e}") from None
    room = self.engine.config.max_seq_len - prompt.token_ids.size
    if room < 1:
      raise bad(where, f"{where}: the prompt of {prompt.token_ids.size} tokens fills the model's context of "
                       f"{self.engine.config.max_seq_len} tokens")
    if sp.max_new_tokens > room:
      if parsed.max_tokens_field is not None:
        name = parsed.max_tokens_field
        raise bad(name, f"{name}={sp.max_new_tokens} with a prompt of "
                                f"{prompt.token_ids.size} tokens exceeds the model's context of "
                                f"{self.engine.config.max_seq_len} tokens")
      sp = dataclasses.replace(sp, max_new_tokens=room)
    reuse = parsed.reuse or self.config.reuse
    try:
      reuse.resolve(self.engine.config)
    except (TypeError, ValueError) as e:
      raise bad("reuse", f"reuse: {e}") from None
    try:
      handle = self.loop.submit(dict(prompt=prompt, sampling=sp, reuse=reuse,
                                     loop=asyncio.get_running_loop(), events=asyncio.Queue(),
                                     request_id=req.id, t_arrival=time.perf_counter()))
    except Full as e:
      raise ApiError(429, f"too many requests: {e}; retry later", None, "rate_limit_error",
                     headers={"Retry-After": str(self.config.retry_after)}) from None
    return parsed, handle

  async def _complete(self, request: HttpRequest, kind: str, endpoint: str):
    try:
      parsed, handle = await self._parse(request, kind)
    except ApiError as e:
      return self._error(endpoint, e)
    answer = Answer(self, parsed, handle)
    if parsed.stream:
      self.metrics.requests.labels(endpoint, "200").inc()
      return StreamingResponse(answer.sse(), media_type="text/event-stream",
                               headers=answer.headers())
    task = asyncio.ensure_future(answer.collect())
    try:
      while True:
        done, _ = await asyncio.wait({task}, timeout=0.05)
        if done:
          break
        if await request.is_disconnected():
          task.cancel()
          self.metrics.requests.labels(endpoint, "499").inc()
          return Response(status_code=499)
      body = task.result()
    except ApiError as e:
      return self._error(endpoint, e)
    finally:
      if not task.done():
        task.cancel()
    self.metrics.requests.labels(endpoint, "200").inc()
    return JSONResponse(body, headers=answer.headers(body))


class Answer:
  """One request's answer: its token events turned into text (stop strings cut, incomplete UTF-8
  held back), as one body or as server-sent event chunks. Whatever ends it early (a stop string,
  the timeout, the client gone) cancels the request in the engine, freeing its row and pages."""

  def __init__(self, server: Server, parsed: ParsedRequest, handle: Handle):
    self.server, self.parsed, self.handle = server, parsed, handle
    self.id = f"{'chatcmpl' if parsed.kind == 'chat.completion' else 'cmpl'}-{handle.request_id}"
    self.created = int(time.time())
    self.tokens: list[int] = []
    self.text_sent = ""
    self.finish_reason: str | None = None
    self.output: RequestOutput | None = None
    self.hold = max((len(s) for s in parsed.stop), default=1) - 1

  def _decode(self, tokens) -> str:
    tok = self.server.engine.tokenizer
    return tok.decode(list(tokens)) if tok is not None else ""

  async def deltas(self):
    """Yields text deltas until the request ends; sets finish_reason and output."""
    timeout = self.server.config.request_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    finished = False
    try:
      while not finished:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
          raise ApiError(504, f"request timed out after {timeout} s", None, "timeout_error")
        try:
          event = await asyncio.wait_for(self.handle.events.get(), left)
        except asyncio.TimeoutError:
          raise ApiError(504, f"request timed out after {timeout} s", None,
                         "timeout_error") from None
        if isinstance(event, Finished):
          self.output = event.output
          if event.output.error is not None:
            raise ApiError(500, f"the request failed: {event.output.error}", None, "server_error")
          finished = True
        elif isinstance(event, Tokens):
          self.tokens.extend(event.token_ids)
        text = self._decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.parsed.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: the text ends before it, the request ends here
          text, finished, self.finish_reason = text[:cut], True, "stop"
          self._cut_tokens()
        elif finished:
          self.finish_reason = self.output.finish_reason
        else:  # hold back what may be the start of a stop string or of a UTF-8 character
          end = len(text) - self.hold
          while end > len(self.text_sent) and text[end - 1] == "\ufffd":
            end -= 1
          text = text[:max(end, len(self.text_sent))]
        if len(text) > len(self.text_sent):
          delta, self.text_sent = text[len(self.text_sent):], text
          yield delta
    finally:
      if not self.handle.done and self.output is None:
        self.server.loop.cancel(self.handle)

  def _cut_tokens(self) -> None:
    for n in range(1, len(self.tokens) + 1):
      if any(s in self._decode(self.tokens[:n]) for s in self.parsed.stop):
        del self.tokens[n:]
        return

  def sparsex_fields(self) -> dict:
    out = {"reuse": self.handle.reuse.mode, "token_ids": list(self.tokens)}
    if self.output is not None and self.output.error is None:
      s = self.output.stats
      out |= {"prompt_tokens": s.n_prompt, "exact_tokens": s.n_exact,
              "continued_tokens": s.n_continued, "reused_tokens": s.n_reused,
              "recomputed_tokens": s.n_recomputed,
              "new_tokens": s.n_new}
    return out

  def usage(self) -> dict:
    n_prompt = int(self.handle.prompt.token_ids.size)
    return {"prompt_tokens": n_prompt, "completion_tokens": len(self.tokens),
            "total_tokens": n_prompt + len(self.tokens)}

  def headers(self, body: dict | None = None) -> dict:
    h = {"x-sparsex-reuse": self.handle.reuse.mode}
    if body is not None:
      x = body["x_sparsex"]
      for name in ("exact_tokens", "continued_tokens", "reused_tokens", "recomputed_tokens"):
        if name in x:
          h[f"x-sparsex-{name.replace('_', '-')}"] = str(x[name])
    return h

  async def collect(self) -> dict:
    async for _ in self.deltas():
      pass
    if self.parsed.kind == "chat.completion":
      choice = {"index": 0, "message": {"role": "assistant", "content": self.text_sent},
                "logprobs": None, "finish_reason": self.finish_reason}
    else:
      choice = {"index": 0, "text": self.text_sent, "logprobs": None,
                "finish_reason": self.finish_reason}
    return {"id": self.id, "object": self.parsed.kind, "created": self.created,
            "model": self.parsed.model, "choices": [choice], "usage": self.usage(),
            "x_sparsex": self.sparsex_fields()}

  def _chunk(self, delta: str | None, finish: str | None = None, role: bool = False) -> dict:
    if self.parsed.kind == "chat.completion":
      d = {"role": "assistant", "content": ""} if role else (
          {"content": delta} if delta is not None else {})
      choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
      obj = "chat.completion.chunk"
    else:
      choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
      obj = "text_completion"
    return {"id": self.id, "object": obj, "created": self.created, "model": self.parsed.model,
            "choices": [choice]}

  async def sse(self):
    def event(obj) -> bytes:
      return f"data: {json.dumps(obj)}\n\n".encode()
    try:
      if self.parsed.kind == "chat.completion":
        yield event(self._chunk(None, role=True))
      async for delta in self.deltas():
        yield event(self._chunk(delta))
      last = self._chunk(None, self.finish_reason)
      last["x_sparsex"] = self.sparsex_fields()
      yield event(last)
      if self.parsed.include_usage:
        usage = self._chunk(None) | {"choices": [], "usage": self.usage()}
        yield event(usage)
    except ApiError as e:  # after the 200 went out: an error event ends the stream
      yield event(e.body())
    yield b"data: [DONE]\n\n"
