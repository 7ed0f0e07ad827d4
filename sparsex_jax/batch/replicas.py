"""One batch job over data-parallel engine replicas on Ray, with one output.

`run_replicated_job` (`sparsex generate --replicas N`) runs a JSONL job on N engine replicas: Ray
actors (`Replica`), each building its own engine and holding one GPU (`tp` GPUs for a sharded
engine, a share of one with `gpus_per_replica` < 1, or CPUs where there is no GPU), on this
machine or on a Ray cluster (`ray_address`). `ReplicaPool` keeps the replicas for several jobs.

The driver (this process) alone touches the files, so a job keeps every guarantee of a
one-engine job (batch/runner.py: `Job`): one lock and one writer on the output, resume by id
whichever replica made a line, bad lines and failed requests in the errors file. It tokenizes
and plans the job, routes groups of requests that share segments to the replica that holds or
will compute them, balanced by the tokens each replica computes (batch/routing.py), sends each
replica windows of its requests in plan order (`PIPELINE` at a time, so a replica never waits on
the driver), and writes each result as it arrives (each window is a Ray streaming generator).

Signals: the first SIGINT/SIGTERM sends no new window and lets every replica finish the windows it
has (their results are written); a second stops at once (unwritten results are redone on resume).

A replica that dies (its actor killed, its process or node lost) is killed for good and its
unfinished requests are routed over the others, beside the segments they hold: their results
were never written, so nothing is lost or written twice. A request whose replica dies
`MAX_DEATHS` times while it runs fails (the errors file names it), so a request that crashes every
replica it meets cannot take the whole job down; if every replica dies the job stops (JobError)
with what finished kept, and a rerun resumes it.

Ray is imported lazily: the package works without it (`pip install -e ".[ray]"` adds it).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import socket
import time
from typing import Any, Callable, Mapping

from sparsex_jax.api import RequestOutput
from sparsex_jax.batch.formats import Defaults, JobError
from sparsex_jax.batch.plan import plan_groups, plan_job
from sparsex_jax.batch.routing import ROUTING, SLACK, Group, route
from sparsex_jax.batch.runner import (WINDOW_BATCHES, Job, Signals, Summary, account, check_job,
                                      compute_shared)
from sparsex_jax.engine import Engine
from sparsex_jax.kv.segment_cache import segment_key
from sparsex_jax.reuse import ReuseConfig, ReuseMethod
from sparsex_jax.validation import is_int, is_real

# Windows in flight per replica: the next one waits in the actor's queue while the current one
# runs, so a replica does not idle while the driver writes results and sends the next.
PIPELINE = 2
# A request whose replica died this many times while running it fails instead of being rerun.
MAX_DEATHS = 2
# Seconds to wait for the replicas to be placed and to build their engines (a cluster may have
# to start nodes; a model may take minutes to load).
START_TIMEOUT_S = 1800.0
# When replicas share a GPU, each gets this share of its memory per GPU-share it holds: jax
# preallocates 75% of a GPU by default, so two replicas on one GPU would not both fit.
GPU_MEMORY_PER_SHARE = 0.9


def import_ray():
  """The `ray` module, or an ImportError that says how to install it."""
  try:
    import ray
  except ImportError:
    raise ImportError('engine replicas run on Ray, which is not installed: pip install -e '
                      '".[ray]" (or pip install "ray>=2.9")') from None
  return ray


# ------------------------------------------------------------------------------------------------
# The replica (runs inside a Ray actor)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class WindowDone:
  """A window's last item: the shared segments the replica computed alone for it, the tokens in
  them, its busy time, and the replica's counters so far: cache dir (loaded, saved) and the
  programs its engine has run."""

  computed: list[str]
  n_precomputed: int
  seconds: float
  disk: tuple[int, int]
  compiled: int = 0


class Replica:
  """One engine replica: run as a Ray actor (`ray.remote(Replica)`). Builds its engine with
  `make_engine`, any picklable zero-argument callable that returns an `Engine` (a
  functools.partial of `Engine.from_pretrained`, say; the engine may already use a cache dir),
  then runs windows of a job's requests, yielding each result as it finishes."""

  def __init__(self, make_engine: Callable[[], Any]):
    self.engine = make_engine()
    if not isinstance(self.engine, Engine):
      raise TypeError(f"make_engine must return an Engine, got {type(self.engine).__name__}")
    disk = self.engine.disk_cache
    self._keep_off_disk = set(disk.keep_off_disk) if disk is not None else set()
    self.reuse: ReuseMethod = ReuseConfig()
    self.batch_size = 16

  def describe(self) -> dict:
    """What the driver needs to read and plan a job as this engine would (every replica is built
    alike), and where this replica runs."""
    import ray
    gpus = ray.get_gpu_ids()
    where = socket.gethostname() + (f" GPU {','.join(map(str, gpus))}" if gpus else " CPU")
    e = self.engine
    return {"config": e.config, "tokenizer": e.tokenizer, "namespace": e.namespace,
            "where": where, "pid": os.getpid()}

  def on_disk(self, keys: list[str]) -> list[str]:
    """Those of `keys` in the engine's cache dir."""
    disk = self.engine.disk_cache
    return [k for k in keys if disk is not None and k in disk]

  def start_job(self, reuse: ReuseMethod, batch_size: int, keep_off_disk: set[str]
                ) -> tuple[tuple[int, int], int]:
    """Settings of the job to come (as run_job's); returns the counters so far (cache dir,
    compilations)."""
    self.reuse, self.batch_size = reuse, batch_size
    disk = self.engine.disk_cache
    if disk is not None:
      disk.keep_off_disk = self._keep_off_disk | keep_off_disk
    return self._disk_counts(), self._compiled()

  def _disk_counts(self) -> tuple[int, int]:
    disk = self.engine.disk_cache
    return (disk.loaded, disk.saved) if disk is not None else (0, 0)

  def _compiled(self) -> int:
    """Programs the engine has run, each compiled (or read from a compile cache) at its first
    run: a replica that meets new ones during a job stalls its requests meanwhile."""
    return self.engine.num_compilations

  def clear_caches(self) -> int:
    return self.engine.clear_caches()

  def run(self, requests: list, shared: list):
    """A window (a Ray streaming generator): its shared segments (ids, namespace) computed alone
    unless cached, then its requests; yields (index, RequestOutput) as each finishes, then
    WindowDone."""
    t0 = time.perf_counter()
    computed = compute_shared(self.engine, shared, self.batch_size)
    results = self.engine.stream(requests, reuse=self.reuse, on_error="return")
    with contextlib.closing(results):
      for index, out in results:
        yield index, out
    yield WindowDone([segment_key(ids, ns) for ids, ns in computed],
                     int(sum(len(ids) for ids, _ in computed)), time.perf_counter() - t0,
                     self._disk_counts(), self._compiled())


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ReplicaStats:
  """What one replica did in a job."""

  index: int
  where: str
  summary: Summary = dataclasses.field(default_factory=Summary)  # its requests and tokens
  busy_s: float = 0.0  # time spent running windows
  disk0: tuple[int, int] = (0, 0)  # cache-dir counters when the job started
  disk: tuple[int, int] = (0, 0)  # and at its latest window
  compiled0: int = 0  # programs its engine had run when the job started
  compiled: int = 0  # and at its latest window
  died: str | None = None

  def as_dict(self) -> dict:
    s = self.summary
    return {"index": self.index, "where": self.where, "requests": s.done, "failed": s.failed,
            # prompt tokens computed whole: new tokens and shared segments computed alone
            "tokens_computed": s.n_new + s.n_precomputed, "n_precomputed": s.n_precomputed,
            "token_layers": s.token_layers, "n_prompt": s.n_prompt, "n_generated": s.n_generated,
            "hit_rate": round(s.hit_rate, 4), "busy_s": round(self.busy_s, 3),
            "segments_loaded": self.disk[0] - self.disk0[0],
            "segments_saved": self.disk[1] - self.disk0[1],
            "new_programs": self.compiled - self.compiled0, "died": self.died}


@dataclasses.dataclass
class _Window:
  replica: int
  indices: list[int]  # into job.runnable
  todo: set[int]  # not yet returned
  results: Any  # the ObjectRefGenerator of Replica.run


class ReplicaPool:
  """N engine replicas on Ray, started once, for one or more jobs.

      with ReplicaPool(functools.partial(Engine.from_pretrained, "smollm2-135m"), 2) as pool:
        summary = pool.run_job("requests.jsonl", "results.jsonl")

  ray_address: the cluster to join ("auto", "ray://host:10001", ...) when this process is not
  connected to Ray yet; None starts a local one. gpus_per_replica: default `tp` (the GPUs one
  engine spans) where the cluster has GPUs, else 0; a share below 1 puts several replicas on one
  GPU, each limited to GPU_MEMORY_PER_SHARE x its share of the memory. cpus_per_replica: Ray's
  CPU accounting for each actor. env: environment variables of the replicas.
  """

  def __init__(self, make_engine: Callable[[], Any], replicas: int = 2, *,
               ray_address: str | None = None, gpus_per_replica: float | None = None,
               cpus_per_replica: float = 1.0, tp: int = 1,
               env: Mapping[str, str] | None = None, start_timeout_s: float = START_TIMEOUT_S):
    if not callable(make_engine):
      raise TypeError("make_engine must be a zero-argument callable that returns an Engine")
    if not is_int(replicas) or replicas < 1:
      raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    if not is_int(tp) or tp < 1:
      raise ValueError(f"tp must be an int >= 1, got {tp!r}")
    for name, value in (("gpus_per_replica", gpus_per_replica),
                        ("cpus_per_replica", cpus_per_replica)):
      if value is not None and (not is_real(value) or not value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if gpus_per_replica is not None and gpus_per_replica > 1 and gpus_per_replica % 1:
      raise ValueError(f"gpus_per_replica above 1 must be a whole number, got {gpus_per_replica}")
    self.ray = ray = import_ray()
    self.actors: list = []
    self._started_ray = False
    if not ray.is_initialized():
      ray.init(address=ray_address, logging_level="warning")
      self._started_ray = True
    try:
      options = _actor_options(ray, replicas, gpus_per_replica, cpus_per_replica, tp, env)
      actor = ray.remote(Replica)
      self.actors = [actor.options(**options).remote(make_engine) for _ in range(replicas)]
      infos = self._started(start_timeout_s)
    except BaseException:
      self.close()
      raise
    self.info = infos[0]
    self.where = [i["where"] for i in infos]
    self.alive = [True] * replicas

  def _started(self, timeout_s: float) -> list[dict]:
    ray = self.ray
    refs = [a.describe.remote() for a in self.actors]
    try:
      return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
      raise JobError(f"the {len(self.actors)} replicas did not start within {timeout_s:.0f} s: "
                     f"the cluster has {_resources(ray)}") from None
    except ray.exceptions.RayError as e:
      raise JobError(f"a replica could not build its engine: {_cause(e)}") from None

  def __enter__(self) -> "ReplicaPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Ends every replica (and Ray, if this pool started it)."""
    for a in self.actors:
      with contextlib.suppress(Exception):
        self.ray.kill(a)
    self.actors = []
    if self._started_ray:
      self.ray.shutdown()
      self._started_ray = False

  @property
  def live(self) -> list[int]:
    """The replicas still alive."""
    return [r for r, ok in enumerate(self.alive) if ok]

  def clear_caches(self) -> None:
    """Drops what every live replica holds in its caches (not its cache dir): the next job starts
    cold, as in a fresh pool."""
    self.ray.get([self.actors[r].clear_caches.remote() for r in self.live])

  def run_job(self, input_path: str, output_path: str, *, routing: str = "affinity",
              slack: float = SLACK, reuse: ReuseMethod = ReuseConfig(),
              defaults: Defaults = Defaults(), batch_size: int = 16, shared: str = "alone",
              errors_path: str | None = None, progress: bool = True,
              model_name: str | None = None, log=None) -> Summary:
    """run_job's job over the live replicas (same arguments, and the routing policy and its
    slack: batch/routing.py). The Summary also has one dict per replica (`replicas`)."""
    check_job(input_path, output_path, shared, batch_size)
    if routing not in ROUTING:
      raise ValueError(f"routing must be one of {ROUTING}, got {routing!r}")
    if not is_real(slack) or not slack >= 0:
      raise ValueError(f"slack must be a number >= 0, got {slack!r}")
    if not any(self.alive):
      raise JobError("every replica of this pool has died; start a new pool")
    info = self.info
    job = Job(input_path, output_path, config=info["config"], tokenizer=info["tokenizer"],
              namespace=info["namespace"], reuse=reuse, defaults=defaults,
              errors_path=errors_path, progress=progress, model_name=model_name, log=log)
    driver = None
    try:
      with job:
        driver = _Driver(self, job, routing, slack, batch_size, shared)
        driver.run()
    except KeyboardInterrupt:
      job.summary.interrupted = True
    finally:
      if driver is not None:
        driver.report()
    return job.summary


class _Driver:
  """One job over a pool: routing, windows in flight, results in, replicas lost."""

  def __init__(self, pool: ReplicaPool, job: Job, routing: str, slack: float, batch_size: int,
               shared: str):
    self.pool, self.job, self.ray = pool, job, pool.ray
    self.routing, self.slack, self.batch_size, self.shared = routing, slack, batch_size, shared
    self.window = batch_size * WINDOW_BATCHES
    self.reads = job.policy.reads_segment_cache
    self.shared_keys = {k for k, c in job.count.items() if c > 1}
    # Computed alone before the windows that read them (run_job's plan.warm).
    self.warm = self.shared_keys if shared == "alone" and self.reads else set()
    live = pool.live
    self.stats = {r: ReplicaStats(r, pool.where[r]) for r in live}
    self.queues: dict[int, collections.deque[list[int]]] = {r: collections.deque() for r in live}
    self.inflight: dict[int, list[_Window]] = {r: [] for r in live}
    self.held: dict[int, set[str]] = {r: set() for r in live}
    self.deaths: collections.Counter[int] = collections.Counter()
    self.computed_by: dict[str, set[int]] = collections.defaultdict(set)
    self.written: set[int] = set()
    # Segments already in the cache dir cost nothing to route: every replica loads them.
    on_disk = set(self.ray.get(pool.actors[live[0]].on_disk.remote(sorted(self.shared_keys))))
    self.on_disk = on_disk
    self.segment_tokens = {k: 0 if k in on_disk else len(job.segments[k][0])
                           for k in self.shared_keys}
    # A request's own tokens: its prompt outside shared segments, and what it generates.
    self.own = [n - sum(len(job.segments[k][0]) for k in ks if k in self.shared_keys) + m
                for n, ks, m in zip(job.n_prompt, job.keys, job.max_new_tokens)]
    counters = self.ray.get([pool.actors[r].start_job.remote(job.reuse, batch_size,
                                                             job.singletons) for r in live])
    for r, (disk, compiled) in zip(live, counters):
      self.stats[r].disk0 = self.stats[r].disk = tuple(disk)
      self.stats[r].compiled0 = self.stats[r].compiled = compiled
    self.assign(list(range(len(job.runnable))), live)

  # ---- routing ----

  def assign(self, indices: list[int], replicas: list[int]) -> None:
    """Routes the requests `indices` (into job.runnable) over `replicas`, and queues each
    replica's share in windows, in plan order."""
    if not indices:
      return
    job = self.job
    keys = [job.keys[i] for i in indices]
    units = plan_groups(keys, self.shared, self.reads, job.count)
    if self.routing == "round_robin":  # blind to the cache: request by request
      units = [[j] for unit in units for j in unit]
    groups = [Group(tuple(indices[j] for j in unit),
                    frozenset(k for j in unit for k in keys[j] if k in self.shared_keys),
                    sum(self.own[indices[j]] for j in unit)) for unit in units]
    plan = route(groups, self.segment_tokens, len(replicas), policy=self.routing,
                 slack=self.slack, loads=[self.load(r) for r in replicas],
                 held=[self.held[r] for r in replicas])
    for slot, r in enumerate(replicas):
      self.held[r] = plan.segments[slot]
      mine = sorted(i for g in plan.replicas[slot] for i in groups[g].requests)
      steps = plan_job([job.keys[i] for i in mine], self.batch_size, self.shared, self.reads,
                       lambda k: k in self.on_disk, job.count).steps
      for step in steps:
        for s in range(0, len(step), self.window):
          self.queues[r].append([mine[j] for j in step[s:s + self.window]])

  def load(self, r: int) -> int:
    """Tokens replica r still has to compute (its queued and unfinished requests)."""
    return sum(self.own[i] for w in self.queues[r] for i in w) + sum(
        self.own[i] for w in self.inflight[r] for i in w.todo)

  # ---- windows ----

  def dispatch(self, r: int) -> None:
    job = self.job
    indices = self.queues[r].popleft()
    shared = [job.segments[k] for k in dict.fromkeys(k for i in indices for k in job.keys[i])
              if k in self.warm]
    # A streaming generator: each result comes back as the replica yields it (the default for
    # generator methods in recent Ray; named for older ones).
    results = self.pool.actors[r].run.options(num_returns="streaming").remote(
        [job.runnable[i].request for i in indices], shared)
    self.inflight[r].append(_Window(r, indices, set(indices), results))

  def run(self) -> None:
    try:
      self._loop()
    except BaseException:  # a second signal, a full disk...: the replicas stop what they run
      for ws in self.inflight.values():
        for w in ws:
          with contextlib.suppress(Exception):
            self.ray.cancel(w.results)
      raise

  def _loop(self) -> None:
    ray = self.ray
    with Signals(self.job.critical, self.job.say) as signals:
      while True:
        if not signals.stop:
          for r, queue in self.queues.items():
            while queue and len(self.inflight[r]) < PIPELINE:
              self.dispatch(r)
        windows = {w.results: w for ws in self.inflight.values() for w in ws}
        if not windows:
          break  # all done, or stopping with nothing in flight
        ready, _ = ray.wait(list(windows), num_returns=1, timeout=0.5)  # signals between waits
        for results in ready:
          w = windows[results]
          if w.replica not in self.inflight:
            continue  # its replica was lost meanwhile
          self.receive(w)
      self.job.summary.interrupted = bool(signals.stop)

  def receive(self, w: _Window) -> None:
    """The next item of window w: a result, the window's end, or its replica's death."""
    ray = self.ray
    try:
      item = ray.get(next(w.results))
    except StopIteration:
      self.inflight[w.replica].remove(w)
      if w.todo:  # never, unless a replica breaks its contract: rerun rather than lose them
        self.assign(sorted(w.todo), list(self.inflight))
      return
    except ray.exceptions.RayActorError as e:
      self.lost(w.replica, e)
      return
    except ray.exceptions.RayTaskError as e:
      raise e.as_instanceof_cause() from None  # the replica's own error (a bad cache file...)
    stats = self.stats[w.replica]
    if isinstance(item, WindowDone):
      stats.busy_s += item.seconds
      stats.disk, stats.compiled = item.disk, item.compiled
      stats.summary.n_precomputed += item.n_precomputed
      stats.summary.token_layers += item.n_precomputed * self.job.config.n_layers
      self.job.precomputed(item.n_precomputed)
      for k in item.computed:
        self.computed_by[k].add(w.replica)
      return
    index, out = item
    i = w.indices[index]
    if i not in w.todo or i in self.written:  # never: each request is in one live window
      raise RuntimeError(f"request {self.job.runnable[i].id!r} came back twice")
    w.todo.discard(i)
    self.written.add(i)
    self.job.finish(self.job.runnable[i], out)
    _count_in(stats.summary, out, self.job.config.n_layers)

  def lost(self, r: int, error: Exception) -> None:
    """Replica r died: killed for good, its unfinished requests routed over the others."""
    with contextlib.suppress(Exception):
      self.pool.ray.kill(self.pool.actors[r])
    self.pool.alive[r] = False
    self.stats[r].died = _cause(error)
    running = [i for w in self.inflight.pop(r) for i in sorted(w.todo)]
    queued = [i for w in self.queues.pop(r) for i in w]
    orphans = []
    for i in running:
      self.deaths[i] += 1
      if self.deaths[i] >= MAX_DEATHS:
        line = self.job.runnable[i]
        self.written.add(i)
        self.job.fail(line.line, line.id, f"its replica died {self.deaths[i]} times while "
                                          f"running it (last: {self.stats[r].died})")
      else:
        orphans.append(i)
    orphans = sorted(orphans + queued)
    survivors = list(self.inflight)
    if not survivors:
      raise JobError(f"every replica died (the last: {self.stats[r].died}); "
                     f"{len(orphans)} requests did not run: rerun the same command to resume "
                     f"(finished results are kept)")
    self.job.say(f"replica {r} ({self.stats[r].where}) died: {self.stats[r].died}; its "
                 f"{len(orphans)} unfinished requests go to replicas {survivors}")
    self.assign(orphans, survivors)

  def report(self) -> None:
    """The per-replica part of the job's summary."""
    s = self.job.summary
    s.routing = self.routing
    s.replicas = [st.as_dict() for st in self.stats.values()]
    s.segments_loaded = sum(r["segments_loaded"] for r in s.replicas)
    s.segments_saved = sum(r["segments_saved"] for r in s.replicas)
    s.segments_duplicated = sum(len(rs) - 1 for rs in self.computed_by.values())
    s.tokens_duplicated = sum((len(rs) - 1) * len(self.job.segments[k][0])
                              for k, rs in self.computed_by.items())


def _count_in(summary: Summary, out: RequestOutput, n_layers: int) -> None:
  if out.error is not None:
    summary.failed += 1
  else:
    account(summary, out, n_layers)


def _cause(error: BaseException) -> str:
  """One line for a Ray error: the exception that ended a replica's traceback ("FileNotFoundError:
  GGUF file not found: ..."), else Ray's first line ("The actor is dead because ...")."""
  lines = [line for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if _EXCEPTION_LINE.match(lines[-1]):
    return lines[-1].strip()[:300]
  return lines[0].strip()[:300]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its task names
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*: ")


def _resources(ray) -> str:
  total = ray.cluster_resources()
  return ", ".join(f"{total.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def _actor_options(ray, replicas: int, gpus: float | None, cpus: float, tp: int,
                   env: Mapping[str, str] | None) -> dict:
  """Ray options of each replica's actor: its GPUs (and, for a share of one, a memory limit)."""
  total = ray.cluster_resources()
  if gpus is None:
    gpus = float(tp) if total.get("GPU", 0) > 0 else 0.0
  if gpus and tp > 1 and gpus < tp:  # a share of a GPU is for one-device engines
    raise ValueError(f"a replica spans tp={tp} GPUs: gpus_per_replica {gpus:g} is too few")
  for name, each in (("GPU", gpus), ("CPU", cpus)):
    if each and replicas * each > total.get(name, 0):
      raise ValueError(f"{replicas} replicas x {each:g} {name} need {replicas * each:g} {name}; "
                       f"the Ray cluster has {_resources(ray)}")
  env_vars = dict(env or {})
  if 0 < gpus < 1:
    env_vars.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{GPU_MEMORY_PER_SHARE * gpus:.3f}")
  # A replica that dies stays dead: its requests are rerun on the others (a restarted actor
  # would rebuild its engine, and a retried window would redo what was already written).
  options = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": 0, "max_task_retries": 0}
  if env_vars:
    options["runtime_env"] = {"env_vars": env_vars}
  return options


def run_replicated_job(make_engine: Callable[[], Any], input_path: str, output_path: str, *,
                       replicas: int = 2, ray_address: str | None = None,
                       gpus_per_replica: float | None = None, cpus_per_replica: float = 1.0,
                       tp: int = 1, env: Mapping[str, str] | None = None,
                       routing: str = "affinity", slack: float = SLACK,
                       reuse: ReuseMethod = ReuseConfig(), defaults: Defaults = Defaults(),
                       batch_size: int = 16, shared: str = "alone",
                       errors_path: str | None = None, progress: bool = True,
                       model_name: str | None = None, log=None) -> Summary:
  """run_job over `replicas` engine replicas on Ray, each built by `make_engine` (see
  ReplicaPool for the placement arguments); the replicas end with the job."""
  check_job(input_path, output_path, shared, batch_size)  # before Ray starts
  if routing not in ROUTING:
    raise ValueError(f"routing must be one of {ROUTING}, got {routing!r}")
  with ReplicaPool(make_engine, replicas, ray_address=ray_address,
                   gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, tp=tp,
                   env=env) as pool:
    return pool.run_job(input_path, output_path, routing=routing, slack=slack, reuse=reuse,
                        defaults=defaults, batch_size=batch_size, shared=shared,
                        errors_path=errors_path, progress=progress, model_name=model_name,
                        log=log)
