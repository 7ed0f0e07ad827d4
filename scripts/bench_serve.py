"""Load benchmark of `sparsex serve` (issue 28, item 5): sparsex reuse against prefix caching only.

Starts `sparsex serve` as a subprocess on a loopback port, once per configuration (the server's
`--reuse`: sparsex, then prefix), and runs the SAME workload against each with the official
`openai` async client, streaming:

  - chat sessions: a system message naming the user, then a document from a small shared set
    (so the document is NOT at position 0: a segment hit, a prefix miss), then several turns; each
    later turn resends the session's earlier turns and answers;
  - agent pipelines: a tool output shared by the pipeline's agents; agent k sees its own system
    message, the tool output and the answers of agents < k (each other's messages).

Sessions and pipelines start at Poisson arrivals so that requests arrive at about `--rate`
requests/s; a session's next turn is sent when its previous answer is in. Per request: TTFT
(request sent -> first streamed token), TPOT ((last - first token) / (tokens - 1)), end-to-end
latency; per configuration: p50/p90/p99, requests/s, output tokens/s, and the server's
/metrics (segment and prefix hit rates, reused, exact and recomputed tokens). Writes
`bench_serve.json` and `bench_serve.png` under `--out`.

Modes:
  (default)        both configurations at --rate; prints the p50 TTFT ratio and TPOT ratio.
  --rate-sweep R.. prefix-only at increasing rates until its p50 TTFT exceeds 1 s, then sparsex at
                   that rate; the issue's target: p50 TTFT cut >= 3x with TPOT within 10%.
  --overhead       one request at a time through the server vs Engine.generate (a separate
                   process, the same engine flags): the target is server TTFT <= 1.1x.
  --smoke          the tiny random model on CPU, a few sessions (seconds to a minute).
  --reuses R..     run only these configurations (a run too long for one call, split in two
                   calls on one warm machine: `--reuses sparsex`, then `--reuses prefix`);
  --merge A B      one report from such runs' bench_serve.json files (same workload and rate:
                   checked), with the comparison and the plot, written under --out.

GPU (Llama-3-8B shapes, random bf16 weights, the synthetic byte tokenizer):
  python scripts/bench_serve.py --model random:llama3-8b --rate-sweep 1 2 4 8 16 --out runs/serve
  python scripts/bench_serve.py --model random:llama3-8b --overhead --out runs/serve
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import dataclasses
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the script's own imports of the project (prefill_work, --overhead)
  sys.path.insert(0, ROOT)
CONFIGS = ("sparsex", "prefix")
# What runs merged into one comparison (--merge) must share: the workload, the load and the server.
MERGE_KEYS = ("model", "rate", "seed", "shape", "page_size", "batch_size", "pool_gib",
              "pool_fraction", "host_cache_bytes", "warmup", "tp")
WORDS = ("harbour ship keeper light tide anchor rope signal storm coast chart compass "
         "lantern beacon sail mast deck crew cargo port wave reef island current").split()


# ---- the workload ----------------------------------------------------------------------------


@dataclasses.dataclass
class Shape:
  """Sizes of the workload (characters: one token each with the byte tokenizer)."""
  sessions: int
  turns: int
  pipelines: int
  agents: int
  doc_chars: int
  n_docs: int
  question_chars: int
  max_tokens: int


def shape_for(args) -> Shape:
  if args.smoke:
    return Shape(sessions=3, turns=2, pipelines=1, agents=2, doc_chars=100, n_docs=1,
                 question_chars=12, max_tokens=6)
  return Shape(sessions=args.sessions, turns=args.turns, pipelines=args.pipelines,
               agents=args.agents, doc_chars=args.doc_chars, n_docs=args.docs,
               question_chars=64, max_tokens=args.max_tokens)


def text(rng: np.random.Generator, n_chars: int) -> str:
  out = []
  while sum(len(w) + 1 for w in out) < n_chars:
    out.append(WORDS[int(rng.integers(len(WORDS)))] + str(int(rng.integers(100))))
  return " ".join(out)[:n_chars]


def programs(shape: Shape, seed: int) -> list[dict]:
  """Each program is a chat session or an agent pipeline: its fixed texts (random, seeded)."""
  rng = np.random.default_rng(seed)
  docs = [text(rng, shape.doc_chars) for _ in range(shape.n_docs)]
  out = []
  for s in range(shape.sessions):
    out.append({"kind": "chat", "system": f"You help user {s}. " + text(rng, 24),
                "doc": docs[int(rng.integers(len(docs)))],
                "questions": [text(rng, shape.question_chars) for _ in range(shape.turns)]})
  for p in range(shape.pipelines):
    out.append({"kind": "agents", "tool": "Tool output: " + text(rng, shape.doc_chars),
                "systems": [f"You are agent {a} of pipeline {p}. " + text(rng, 24)
                            for a in range(shape.agents)],
                "tasks": [text(rng, shape.question_chars) for _ in range(shape.agents)]})
  rng.shuffle(out)
  return out


def n_requests(program: dict) -> int:
  return len(program["questions"] if program["kind"] == "chat" else program["tasks"])


# ---- the client ------------------------------------------------------------------------------


async def one_request(client, model: str, messages: list[dict], max_tokens: int, seed: int
                      ) -> tuple[dict, str]:
  t0 = time.perf_counter()
  t_first, answer, x = None, "", {}
  stream = await client.chat.completions.create(
      model=model, messages=messages, max_tokens=max_tokens, temperature=0, seed=seed,
      stream=True)
  async for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
      if t_first is None:
        t_first = time.perf_counter()
      answer += chunk.choices[0].delta.content
    extra = (chunk.model_extra or {}).get("x_sparsex")
    if extra:
      x = extra
  t_end = time.perf_counter()
  n = len(x.get("token_ids", ())) or len(answer)
  t_first = t_end if t_first is None else t_first
  record = {"ttft_s": t_first - t0, "e2e_s": t_end - t0, "output_tokens": n,
            "tpot_s": (t_end - t_first) / (n - 1) if n > 1 else None,
            "prompt_tokens": x.get("prompt_tokens"), "reused_tokens": x.get("reused_tokens"),
            "exact_tokens": x.get("exact_tokens"),
            "continued_tokens": x.get("continued_tokens"), "t_sent": t0}
  return record, answer


async def run_program(client, model: str, program: dict, shape: Shape, seed: int,
                      records: list) -> None:
  try:
    if program["kind"] == "chat":
      messages = [{"role": "system", "content": program["system"]},
                  {"role": "user", "content": "Document: " + program["doc"]}]
      messages.append({"role": "assistant", "content": "Read."})
      for i, q in enumerate(program["questions"]):
        messages.append({"role": "user", "content": q})
        record, answer = await one_request(client, model, messages, shape.max_tokens, seed + i)
        records.append(record | {"kind": "chat", "turn": i})
        messages.append({"role": "assistant", "content": answer})
    else:
      answers: list[str] = []
      for a, (system, task) in enumerate(zip(program["systems"], program["tasks"])):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": program["tool"]}]
        for b, prior in enumerate(answers):
          messages.append({"role": "user", "content": f"Agent {b} said: {prior}"})
        messages.append({"role": "user", "content": task})
        record, answer = await one_request(client, model, messages, shape.max_tokens, seed + a)
        records.append(record | {"kind": "agents", "turn": a})
        answers.append(answer)
  except Exception as e:  # pylint: disable=broad-except
    records.append({"error": f"{type(e).__name__}: {e}"})


# Seconds between progress lines: a run stopped by a time limit still shows how far it got and
# where the server's time went (round 19's GPU run printed nothing in 565 s).
PROGRESS_S = 20.0
PROGRESS_METRICS = ("sparsex_compiled_programs", "sparsex_compile_stall_seconds_total",
                    "sparsex_host_tier_spill_seconds_total", "sparsex_host_tier_spill_reads_total",
                    "sparsex_host_tier_bytes_used",
                    "sparsex_host_tier_continued_tokens_total", "sparsex_requests_running",
                    "sparsex_requests_waiting")


def parse_metrics(text: str) -> dict[str, float]:
  """Prometheus text exposition -> {sample name with labels: value}."""
  values = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      name, _, value = line.rpartition(" ")
      values[name] = float(value)
  return values


async def report_progress(url: str, label: str, records: list, n_requests_total: int,
                          t0: float) -> None:
  """Prints a progress line every PROGRESS_S until cancelled."""
  import httpx
  async with httpx.AsyncClient(base_url=url, timeout=10) as client:
    while True:
      await asyncio.sleep(PROGRESS_S)
      done = sum("error" not in r for r in records)
      try:
        values = parse_metrics((await client.get("/metrics")).text)
        server = ", ".join(f"{k.removeprefix('sparsex_')} {values[k]:.4g}"
                           for k in PROGRESS_METRICS if k in values)
      except httpx.HTTPError as e:
        server = f"metrics unavailable ({type(e).__name__})"
      print(f"[progress {label}] {time.perf_counter() - t0:.0f} s: {done} of "
            f"{n_requests_total} requests answered, {len(records) - done} failed; {server}",
            flush=True)


async def run_workload(url: str, model: str, progs: list[dict], shape: Shape, rate: float,
                       seed: int, label: str = "", time_limit: float | None = None
                       ) -> tuple[list[dict], float, bool]:
  """Runs the programs against the server: (records, seconds, cut). With time_limit, what has
  not finished by then is cancelled (cut True): a stalled server still gives a report."""
  import openai
  rng = np.random.default_rng(seed + 1)
  requests_per_program = np.mean([n_requests(p) for p in progs])
  gaps = rng.exponential(requests_per_program / rate, len(progs))  # Poisson program starts
  records: list[dict] = []
  client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0,
                              timeout=600)
  t0 = time.perf_counter()
  progress = asyncio.create_task(report_progress(
      url, label, records, int(sum(n_requests(p) for p in progs)), t0))
  tasks = []

  async def launch_all():
    for i, (program, gap) in enumerate(zip(progs, gaps)):
      await asyncio.sleep(float(gap))
      tasks.append(asyncio.create_task(run_program(client, model, program, shape, 1000 * i,
                                                   records)))
    await asyncio.gather(*tasks)

  cut = False
  try:
    await asyncio.wait_for(launch_all(), time_limit)
  except asyncio.TimeoutError:
    cut = True
    for task in tasks:
      task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"[{label}] cut at the time limit ({time_limit:g} s)", flush=True)
  finally:
    progress.cancel()
  elapsed = time.perf_counter() - t0
  await client.close()
  return records, elapsed, cut


# ---- the server ------------------------------------------------------------------------------


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def engine_argv(args) -> list[str]:
  """The engine flags of `sparsex serve` (and of the --overhead engine process)."""
  argv = ["--model", args.model]
  if args.model.startswith("random:"):
    argv += ["--tokenizer", "bytes"]
  if args.smoke:
    argv += ["--page-size", "4", "--pool-gib", str(args.pool_gib or 0.004), "--batch-size", "4"]
  else:
    argv += ["--page-size", str(args.page_size), "--batch-size", str(args.batch_size)]
    argv += ["--pool-fraction", str(args.pool_fraction)] if args.pool_gib is None else [
        "--pool-gib", str(args.pool_gib)]
  if args.tp:
    argv += ["--tp", str(args.tp)]
  if args.host_cache_bytes:
    argv += ["--host-cache-bytes", args.host_cache_bytes]
  return argv


def child_env(args) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if args.smoke:
    env["JAX_PLATFORMS"] = "cpu"
    if args.tp and args.tp > 1:
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.tp}"
  return env


# Servers still running: closed at exit, also when the benchmark is stopped with SIGTERM (main
# turns it into SystemExit). A server orphaned by a killed benchmark kept the GPU's memory, and
# the next server aborted at start (the first H100 run, docs/serving_log.md).
_RUNNING: set["ServerProcess"] = set()


@atexit.register
def _close_servers() -> None:
  for server in list(_RUNNING):
    server.close()


class ServerProcess:
  def __init__(self, args, reuse: str):
    import httpx
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.cmd = [sys.executable, "-m", "sparsex_jax.entrypoints.cli", "serve", *engine_argv(args),
                "--port", str(self.port), "--reuse", reuse, "--served-model-name", "bench",
                "--max-tokens", str(shape_for(args).max_tokens), "--max-waiting", "4096"]
    self.proc = subprocess.Popen(self.cmd, env=child_env(args), cwd=ROOT)
    _RUNNING.add(self)
    started = time.time()
    deadline = started + args.start_timeout
    while True:
      if self.proc.poll() is not None:
        raise RuntimeError(f"the server exited ({self.proc.returncode}): {shlex.join(self.cmd)}")
      try:
        if httpx.get(self.url + "/health").status_code == 200:
          print(f"[{reuse} server] up in {time.time() - started:.0f} s", flush=True)
          return
      except httpx.TransportError:
        pass
      if time.time() > deadline:
        self.close()
        raise RuntimeError("the server did not start")
      time.sleep(0.2)

  def metrics(self) -> dict[str, float]:
    import httpx
    return parse_metrics(httpx.get(self.url + "/metrics").text)

  def close(self) -> None:
    _RUNNING.discard(self)
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(120)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


# ---- statistics ------------------------------------------------------------------------------


def pcts(xs) -> dict:
  xs = [x for x in xs if x is not None]
  if not xs:
    return {"p50": None, "p90": None, "p99": None, "n": 0}
  return {f"p{q}": float(np.percentile(xs, q)) for q in (50, 90, 99)} | {"n": len(xs)}


def summarize(records: list[dict], elapsed: float, metrics: dict[str, float]) -> dict:
  ok = [r for r in records if "error" not in r]
  keys = ("sparsex_segment_cache_hit_rate", "sparsex_prefix_cache_hit_rate",
          "sparsex_reused_tokens_total", "sparsex_exact_tokens_total",
          "sparsex_continued_tokens_total", "sparsex_recomputed_tokens_total",
          "sparsex_prompt_tokens_total",
          "sparsex_generation_tokens_total", "sparsex_compiled_programs",
          "sparsex_compiling_steps_total", "sparsex_compile_stall_seconds_total",
          "sparsex_programs_compiled_ahead_total", "sparsex_admissions_deferred_total",
          "sparsex_host_tier_bytes_used", "sparsex_host_tier_continued_tokens_total",
          "sparsex_host_tier_segment_loads_total", "sparsex_host_tier_spill_seconds_total",
          "sparsex_output_tokens_cached_total")
  return {"requests": len(ok), "errors": [r["error"] for r in records if "error" in r],
          "elapsed_s": elapsed,
          "ttft_s": pcts(r["ttft_s"] for r in ok), "tpot_s": pcts(r["tpot_s"] for r in ok),
          "e2e_s": pcts(r["e2e_s"] for r in ok),
          "throughput": {"requests_per_s": len(ok) / elapsed,
                         "output_tokens_per_s": sum(r["output_tokens"] for r in ok) / elapsed},
          "server_metrics": {k.removeprefix("sparsex_"): metrics.get(k) for k in keys},
          "records": ok}


def run_config(args, reuse: str, rate: float, progs: list[dict], shape: Shape) -> dict:
  server = ServerProcess(args, reuse)
  try:
    # Compiles the programs before the clock runs: two sessions of two turns and a pipeline of
    # two agents, concurrently, so the shapes of first turns, of continued turns, of agents that
    # reuse another's output and of batches of a few prefills are met once (the same for every
    # configuration; a long-running server meets them once in its life).
    # --warmup full: the whole workload once more first, another seed, at the same rate: the
    # batch, token and active-set buckets a loaded server meets are compiled before the clock
    # runs (round 17: a cold sparsex server compiled 7 programs during the timed run, and the
    # requests waiting on them set its p90), and the pool starts full, as a server's is.
    small = dataclasses.replace(shape, sessions=2, pipelines=1, turns=2, agents=2)
    warm = programs(shape if args.warmup == "full" else small, seed=args.seed + 99)
    t0 = time.perf_counter()
    asyncio.run(run_workload(server.url, "bench", warm, shape,
                             rate if args.warmup == "full" else 1e6, args.seed,
                             f"{reuse} warm-up"))
    print(f"[{reuse} @ {rate:g} req/s] warm-up ({args.warmup}) done in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    # The compile thread's own list (slot copies, host-tier copies) finished before the clock
    # runs too: its compiles would share the host with the timed requests.
    t0 = time.perf_counter()
    while server.metrics().get("sparsex_programs_to_compile_ahead", 0) > 0:
      if time.perf_counter() - t0 > args.start_timeout:
        raise RuntimeError(f"{reuse}: the server's compile thread did not finish in "
                           f"{args.start_timeout} s")
      time.sleep(0.5)
    compile_wait = time.perf_counter() - t0
    before = server.metrics()
    records, elapsed, cut = asyncio.run(run_workload(server.url, "bench", progs, shape, rate,
                                                     args.seed, f"{reuse} @ {rate:g} req/s",
                                                     args.time_limit))
    after = server.metrics()
  finally:
    server.close()
  delta = {k: after[k] - before.get(k, 0.0) if k.endswith("_total") else after[k]
           for k in after}
  out = summarize(records, elapsed, delta) | {"reuse": reuse, "rate": rate,
                                               "server_command": shlex.join(server.cmd)}
  out["prefill_work_tokens"] = prefill_work(out["server_metrics"], args, reuse)
  out["compile_ahead_wait_s"] = round(compile_wait, 3)
  # A run cut at --time-limit: its percentiles are those of the requests answered by then (the
  # slowest are missing), so it is reported, never compared as if whole.
  out["cut_at_time_limit"] = cut
  out["unanswered"] = int(sum(n_requests(q) for q in progs)) - len(records)
  print(f"[{reuse} @ {rate:g} req/s] {out['requests']} requests, {len(out['errors'])} errors: "
        f"TTFT p50 {fmt(out['ttft_s']['p50'])} p90 {fmt(out['ttft_s']['p90'])}, "
        f"TPOT p50 {fmt(out['tpot_s']['p50'])}, "
        f"{out['throughput']['output_tokens_per_s']:.1f} output tok/s, reused tokens "
        f"{out['server_metrics']['reused_tokens_total']:.0f}, segment hit rate "
        f"{out['server_metrics']['segment_cache_hit_rate']}, compiled programs "
        f"{out['server_metrics']['compiled_programs']} (steps stalled compiling: "
        f"{out['server_metrics']['compiling_steps_total']}, "
        f"{out['server_metrics']['compile_stall_seconds_total']} s; compiled ahead: "
        f"{out['server_metrics']['programs_compiled_ahead_total']})", flush=True)
  return out


def prefill_work(metrics: dict, args, reuse: str) -> float | None:
  """The prefill work of a run in full-token units (computed tokens, plus each reused token's
  full layers and each recomputed token's sparse layers): what the caches saved, whatever the
  queueing. Needs the model's depth and the method's T: known for random:PRESET models only."""
  if not args.model.startswith("random:"):
    return None
  import sparsex_jax as sx  # pylint: disable=import-outside-toplevel
  from models.config import get_config  # pylint: disable=import-outside-toplevel
  cfg = get_config(args.model.removeprefix("random:"))
  t, n_layers = sx.ReuseConfig(reuse).resolve(cfg).layer_threshold, cfg.n_layers
  m = {k: metrics.get(k) or 0.0 for k in ("prompt_tokens_total", "exact_tokens_total",
                                         "reused_tokens_total", "recomputed_tokens_total")}
  computed = m["prompt_tokens_total"] - m["exact_tokens_total"] - m["reused_tokens_total"]
  return (computed + m["reused_tokens_total"] * t / n_layers
          + m["recomputed_tokens_total"] * (n_layers - t) / n_layers)


def fmt(seconds) -> str:
  return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def compare(results: dict) -> dict:
  """The issue's load target from one sparsex and one prefix run at the same rate."""
  s, p = results["sparsex"], results["prefix"]
  ttft_cut = p["ttft_s"]["p50"] / s["ttft_s"]["p50"] if s["ttft_s"]["p50"] else None
  tpot_ratio = (s["tpot_s"]["p50"] / p["tpot_s"]["p50"]
                if s["tpot_s"]["p50"] and p["tpot_s"]["p50"] else None)
  applies = p["ttft_s"]["p50"] is not None and p["ttft_s"]["p50"] > 1.0
  cut = bool(s.get("cut_at_time_limit") or p.get("cut_at_time_limit"))
  met = not cut and applies and ttft_cut is not None and ttft_cut >= 3 and (
      tpot_ratio is not None and tpot_ratio <= 1.10)
  work = (p["prefill_work_tokens"] / s["prefill_work_tokens"]
          if p.get("prefill_work_tokens") and s.get("prefill_work_tokens") else None)
  return {"prefix_p50_ttft_s": p["ttft_s"]["p50"], "p50_ttft_cut": ttft_cut,
          "prefill_work_cut": work,
          "p50_tpot_ratio": tpot_ratio, "load_applies": applies, "target_met": bool(met),
          "cut_at_time_limit": cut,
          "target": "prefix-only p50 TTFT > 1 s; sparsex p50 TTFT cut >= 3x; TPOT within 10%"}


# ---- --overhead ------------------------------------------------------------------------------


def overhead_messages(shape: Shape, n: int, seed: int) -> list[list[dict]]:
  rng = np.random.default_rng(seed)
  return [[{"role": "system", "content": text(rng, 24)},
           {"role": "user", "content": text(rng, shape.doc_chars)}] for _ in range(n)]


def engine_ttft(argv: list[str], reuse: str, requests_file: str, max_tokens: int) -> list[float]:
  """(In the --_engine-ttft process) Engine.generate's TTFT of each request, one at a time."""
  import sparsex_jax as sx
  from sparsex_jax.entrypoints import cli
  p = argparse.ArgumentParser()
  cli._add_engine_args(p)  # pylint: disable=protected-access
  args = p.parse_args(argv)
  engine = cli._build_engine(args)  # pylint: disable=protected-access
  out = []
  with open(requests_file) as f:
    conversations = json.load(f)
  for messages in conversations:
    req = engine.chat_request(messages, sampling=sx.SamplingParams(max_new_tokens=max_tokens))
    [o] = engine.generate([req], reuse=sx.ReuseConfig(reuse))
    out.append(o.stats.first_token_s)
  return out


def run_overhead(args, shape: Shape) -> dict:
  n_warm, n = 2, 4 if args.smoke else 16
  conversations = overhead_messages(shape, n_warm + n, args.seed + 7)
  server = ServerProcess(args, args.reuse)
  try:
    async def sequential():
      import openai
      client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0,
                                  timeout=600)
      ttfts = []
      for i, messages in enumerate(conversations):
        record, _ = await one_request(client, "bench", messages, shape.max_tokens, i)
        ttfts.append(record["ttft_s"])
      await client.close()
      return ttfts
    served = asyncio.run(sequential())[n_warm:]
  finally:
    server.close()
  path = os.path.join(args.out, "overhead_requests.json")
  with open(path, "w") as f:
    json.dump(conversations, f)
  cmd = [sys.executable, os.path.abspath(__file__), "--_engine-ttft", path, "--reuse",
         args.reuse, "--max-tokens", str(shape.max_tokens), "--", *engine_argv(args)]
  proc = subprocess.run(cmd, env=child_env(args), capture_output=True, text=True, cwd=ROOT)
  if proc.returncode:
    raise RuntimeError(f"the engine process failed: {proc.stderr[-4000:]}")
  engine = json.loads(proc.stdout.strip().splitlines()[-1])[n_warm:]
  ratio = float(np.median(served) / np.median(engine))
  print(f"[overhead] one request at a time: server p50 TTFT {fmt(np.median(served))}, "
        f"Engine.generate {fmt(np.median(engine))}: {ratio:.3f}x (target <= 1.1x: "
        f"{'met' if ratio <= 1.1 else 'NOT met'})", flush=True)
  return {"server_ttft_s": pcts(served), "engine_ttft_s": pcts(engine), "p50_ratio": ratio,
          "target_met": ratio <= 1.1, "target": "server TTFT within 1.1x of Engine.generate's"}


# ---- output ----------------------------------------------------------------------------------


def device_info(args) -> dict:
  code = ("import jax, json; d = jax.devices(); print(json.dumps({'device': d[0].device_kind, "
          "'platform': d[0].platform, 'count': len(d), 'jax': jax.__version__}))")
  proc = subprocess.run([sys.executable, "-c", code], env=child_env(args), capture_output=True,
                        text=True)
  try:
    return json.loads(proc.stdout.strip().splitlines()[-1])
  except (IndexError, ValueError):
    return {"device": "unknown", "error": proc.stderr[-1000:]}


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for reuse, res in results.items():
    for ax, key in zip(axes, ("ttft_s", "tpot_s")):
      xs = np.sort([r[key] for r in res["records"] if r[key] is not None])
      if xs.size:
        ax.plot(xs * 1e3, np.arange(1, xs.size + 1) / xs.size,
                label=f"{reuse} (p50 {np.median(xs) * 1e3:.1f} ms)")
  for ax, title in zip(axes, ("time to first token", "time per output token")):
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{title} (CDF)")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="random:llama3-8b",
                 help="a served model: random:PRESET (random weights, byte tokenizer) or a path")
  p.add_argument("--tp", type=int, default=None)
  p.add_argument("--reuse", default="sparsex", help="the reuse of the --overhead run")
  p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
  p.add_argument("--rate-sweep", type=float, nargs="+", metavar="RATE",
                 help="prefix-only at these rates until p50 TTFT > 1 s, then sparsex there")
  p.add_argument("--overhead", action="store_true",
                 help="one request at a time: server TTFT vs Engine.generate's")
  p.add_argument("--sessions", type=int, default=48)
  p.add_argument("--turns", type=int, default=4)
  p.add_argument("--pipelines", type=int, default=16)
  p.add_argument("--agents", type=int, default=4)
  p.add_argument("--docs", type=int, default=8, help="documents the chat sessions share")
  p.add_argument("--doc-chars", type=int, default=4000, help="tokens of a document / tool output")
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--pool-gib", type=float, default=None)
  p.add_argument("--pool-fraction", type=float, default=0.8)
  p.add_argument("--host-cache-bytes", default=None, metavar="N",
                 help="the servers' host-memory tier (e.g. 32G): evicted segments and chat "
                      "histories are kept there and loaded back (prefix-only keeps neither)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--reuses", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                 help="the configurations to run (default: both)")
  p.add_argument("--merge", nargs="+", metavar="JSON",
                 help="merge the reports of runs of one configuration each, then exit")
  p.add_argument("--warmup", choices=("small", "full"), default="small",
                 help="before the timed run: two sessions and a pipeline (small), or the whole "
                      "workload with another seed at the same rate (full: a server in steady "
                      "state, every bucket compiled and the pool full)")
  p.add_argument("--start-timeout", type=float, default=900)
  p.add_argument("--time-limit", type=float, default=None, metavar="S",
                 help="cancel what a configuration's timed run has not finished after S seconds "
                      "and report it as cut (a run that must fit a machine's time limit)")
  p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few sessions")
  p.add_argument("--out", default="runs/bench_serve")
  p.add_argument("--_engine-ttft", dest="engine_ttft", help=argparse.SUPPRESS)
  p.add_argument("engine_args", nargs="*", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  try:  # SIGTERM (a timeout) exits through atexit, which closes the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  except ValueError:  # not the main thread: whoever runs us handles signals
    pass
  if args.engine_ttft:  # the --overhead reference process
    print(json.dumps(engine_ttft(args.engine_args, args.reuse, args.engine_ttft,
                                 args.max_tokens)))
    return 0
  if args.merge:
    try:
      report = merge(args.merge)
    except (OSError, ValueError, KeyError) as e:
      p.error(f"--merge: {e}")
    os.makedirs(args.out, exist_ok=True)
    print_comparison(report["rate"], report["comparison"])
    plot(report["results"], os.path.join(args.out, "bench_serve.png"))
    print(f"wrote {_save(report, args.out)}")
    return 0
  if args.smoke and args.model == "random:llama3-8b":
    args.model = "random:tiny"
  os.makedirs(args.out, exist_ok=True)
  shape = shape_for(args)
  report = {"command": shlex.join([sys.executable, *sys.argv]) if argv is None else
            shlex.join(["scripts/bench_serve.py", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {k: v for k, v in vars(args).items() if k not in ("engine_ttft",
                                                                          "engine_args")}
            | {"shape": dataclasses.asdict(shape), "engine_argv": engine_argv(args)},
            **device_info(args)}
  progs = programs(shape, args.seed)
  report["workload"] = {"programs": len(progs),
                        "requests": int(sum(n_requests(q) for q in progs))}
  if args.overhead:
    report["overhead"] = run_overhead(args, shape)
  else:
    rate = args.rate
    sweep = {}
    if args.rate_sweep:
      for rate in sorted(args.rate_sweep):
        sweep[rate] = run_config(args, "prefix", rate, progs, shape)
        if sweep[rate]["ttft_s"]["p50"] is not None and sweep[rate]["ttft_s"]["p50"] > 1.0:
          break
      report["sweep"] = {str(r): {k: v for k, v in res.items() if k != "records"}
                         for r, res in sweep.items()}
    report["rate"] = rate
    report["results"] = results = {}
    if "sparsex" in args.reuses:
      results["sparsex"] = run_config(args, "sparsex", rate, progs, shape)
      _save(report, args.out)  # a run cut short keeps what it measured
    if "prefix" in args.reuses:
      results["prefix"] = sweep.get(rate) or run_config(args, "prefix", rate, progs, shape)
    if len(results) == len(CONFIGS):
      report["comparison"] = compare(results)
      print_comparison(rate, report["comparison"])
    plot(results, os.path.join(args.out, "bench_serve.png"))
  print(f"wrote {_save(report, args.out)}")
  return 0


def print_comparison(rate: float, c: dict) -> None:
  print(f"[compare @ {rate:g} req/s] prefix-only p50 TTFT {fmt(c['prefix_p50_ttft_s'])}; "
        f"sparsex cuts it {c['p50_ttft_cut'] or float('nan'):.2f}x (prefill work "
        f"{c['prefill_work_cut'] or float('nan'):.2f}x), TPOT ratio "
        f"{c['p50_tpot_ratio'] or float('nan'):.3f}; load target "
        f"{'applies' if c['load_applies'] else 'does not apply (prefix p50 TTFT <= 1 s)'}, "
        f"{'met' if c['target_met'] else 'not met'}", flush=True)


def merge(paths: list[str]) -> dict:
  """One report from runs of one configuration each (--reuses), which must share the workload,
  the rate and the device: the later run's results join the first's."""
  reports = []
  for path in paths:
    with open(path) as f:
      reports.append(json.load(f))
  report = reports[0]
  same = ("workload", "rate", "device", "jax")
  for path, other in zip(paths[1:], reports[1:]):
    for key in same:
      if other.get(key) != report.get(key):
        raise ValueError(f"{path}: {key} {other.get(key)!r} differs from {paths[0]}'s "
                         f"{report.get(key)!r}; only runs of one workload, rate and device merge")
    for key in MERGE_KEYS:
      a, b = report["config"].get(key), other["config"].get(key)
      if a != b:
        raise ValueError(f"{path}: config {key} {b!r} differs from {paths[0]}'s {a!r}")
    for reuse, res in other["results"].items():
      if reuse in report["results"]:
        raise ValueError(f"{path}: {reuse} is in {paths[0]} too")
      report["results"][reuse] = res
  missing = [r for r in CONFIGS if r not in report["results"]]
  if missing:
    raise ValueError(f"no run of {', '.join(missing)} among {', '.join(paths)}")
  report["merged_from"] = [{"path": p, "command": r.get("command"), "date": r.get("date")}
                           for p, r in zip(paths, reports)]
  report["comparison"] = compare(report["results"])
  return report


def _save(report: dict, out: str) -> str:
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "bench_serve.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  return path


if __name__ == "__main__":
  sys.exit(main())
