"""The `sparsex` command line.

  sparsex demo                                   the embedded default model on CPU: reuse vs full
  (demo, generate, cache warm and eval take --tp N: tensor parallelism over N devices)
  sparsex generate --input F --output O ...      an offline batch job over JSONL (batch/);
                                                 --replicas N: over N engine replicas on Ray
  sparsex cache warm --corpus F --cache-dir D    precompute a corpus into a segment cache on disk
  sparsex cache info D                           what a segment cache on disk holds
  sparsex serve --model M [--port P]             an OpenAI-compatible server (docs/SERVING.md)
  sparsex eval [--quick] ...                     reuse quality of every method (docs/evaluation.md)

Subcommands are thin: the work is in sparsex_jax/batch/, sparsex_jax/kv/persist.py and
sparsex_jax/research/.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

from sparsex_jax.batch.plan import SHARED
from sparsex_jax.batch.routing import ROUTING
from sparsex_jax.entrypoints.demo import PASSAGE as DEMO_PASSAGE
from sparsex_jax.entrypoints.demo import QUESTION as DEMO_QUESTION
from sparsex_jax.scheduler import DEFAULT_MAX_PREFILL_TOKENS
from sparsex_jax.entrypoints.demo import QUESTION2 as DEMO_QUESTION2
from sparsex_jax.reuse import REUSE_MODES


def _demo(args) -> int:
  from sparsex_jax.entrypoints import demo
  return demo.run(args.model, args.passage, args.question, args.question2, args.max_new_tokens,
                  tp=args.tp)


def _add_tp_arg(p) -> None:
  p.add_argument("--tp", type=int, default=None, metavar="N",
                 help="tensor parallelism over N devices (weights Megatron-style, KV pool by KV "
                      "heads; N must divide the model's KV heads; docs/SHARDING.md). Default: one "
                      "device, unsharded")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="sparsex", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="answer a question about a passage with the default model")
  demo.add_argument("--model", default="smollm2-135m",
                    help="smollm2-135m (embedded), a .gguf file or a Hugging Face folder")
  demo.add_argument("--passage", default=DEMO_PASSAGE)
  demo.add_argument("--question", default=DEMO_QUESTION)
  demo.add_argument("--question2", default=DEMO_QUESTION2)
  demo.add_argument("--max-new-tokens", type=int, default=32)
  _add_tp_arg(demo)
  _add_generate_parser(sub)
  _add_cache_parser(sub)
  serve = sub.add_parser("serve", help="an OpenAI-compatible server (docs/SERVING.md)")
  from sparsex_jax.entrypoints.serve import server as serve_server
  serve_server.add_arguments(serve, _add_engine_args)
  ev = sub.add_parser("eval", help="reuse quality of every method on four workloads "
                      "(docs/evaluation.md)")
  from sparsex_jax.research import runner
  runner.add_arguments(ev)
  _add_tp_arg(ev)
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  for name in ("passage", "question", "question2"):
    if args.command == "demo" and not getattr(args, name).strip():
      print(f"sparsex: error: --{name} must not be empty", file=sys.stderr)
      return 2
  from sparsex_jax.batch import JobError
  try:
    if args.command == "eval":
      return runner.run(args, argv[1:])
    if args.command == "serve":
      _use_compile_cache(args)
      return serve_server.run(args, _build_engine)
    return {"demo": _demo, "generate": _generate, "cache": _cache}[args.command](args)
  except (ValueError, JobError, OSError) as e:  # CacheError is a ValueError naming the file
    # An unusable argument, input, output or cache: one line naming it, exit 2 (1 means "some
    # lines failed, the rest ran"). --debug shows the traceback.
    if getattr(args, "debug", False):
      raise
    if isinstance(e, OSError) and e.filename is not None:
      e = f"{e.filename}: {e.strerror}"
    print(f"sparsex: error: {e}", file=sys.stderr)
    return EXIT_USAGE


# ------------------------------------------------------------------------------------------------
# generate and cache (batch jobs)
# ------------------------------------------------------------------------------------------------

EXIT_FAILED_LINES = 1  # the job ran, some lines failed (see the errors file)
EXIT_USAGE = 2  # bad arguments, a model or cache that cannot be used


def _add_cache_key_arg(p) -> None:
  p.add_argument("--cache-key", metavar="SECRET",
                 help="authenticate the cache dir's index with this key (HMAC-SHA256): a cache "
                      "changed without it is refused (default: $SPARSEX_CACHE_KEY; "
                      "docs/SECURITY.md)")


def _add_namespace_arg(p) -> None:
  p.add_argument("--namespace", default="",
                 help="cache namespace: segments cached under one are neither reused nor seen "
                      "under another (a line's own \"namespace\" wins; docs/SECURITY.md)")


def _add_debug_arg(p) -> None:
  p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_engine_args(p) -> None:
  p.add_argument("--model", default="smollm2-135m",
                 help="smollm2-135m (embedded), a .gguf file, a Hugging Face folder, or "
                      "random:PRESET (random weights at a preset's shapes, token ids only)")
  p.add_argument("--tokenizer", choices=("bytes",), default=None,
                 help="with random:PRESET: bytes gives a synthetic byte-level tokenizer with a "
                      "plain chat template, so text and chat requests work (benchmarks)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="auto: float32 on CPU, bfloat16 on GPU")
  p.add_argument("--page-size", type=int, default=16, help="KV page size in tokens (power of 2)")
  _add_cache_key_arg(p)
  _add_namespace_arg(p)
  _add_debug_arg(p)
  p.add_argument("--batch-size", type=int, default=16, help="requests per batch")
  p.add_argument("--max-prefill-tokens", type=int, default=DEFAULT_MAX_PREFILL_TOKENS,
                 help="padded tokens one prefill may compute (requests x longest prompt; a "
                      "longer prompt runs alone): bounds a prefill's activation memory "
                      f"(default {DEFAULT_MAX_PREFILL_TOKENS}; 0: no bound)")
  _add_tp_arg(p)
  p.add_argument("--compile-cache", metavar="DIR",
                 help="keep compiled programs here for later runs; 'off' for none (default: "
                      "$SPARSEX_COMPILE_CACHE, else ~/.cache/sparsex-jax/xla; jax's "
                      "JAX_COMPILATION_CACHE_DIR wins when set)")
  pool = p.add_mutually_exclusive_group()
  pool.add_argument("--pool-gib", type=float, help="KV pool size in GiB (default 1)")
  pool.add_argument("--pool-fraction", type=float,
                    help="KV pool as a fraction of the device memory free after loading the model")
  p.add_argument("--host-cache-bytes", type=_byte_count, default=None, metavar="N",
                 help="host-memory tier under the KV pool: segments and chat histories the pool "
                      "evicts are kept in N bytes of host memory (suffixes K, M, G: 8G); "
                      "segments then go to --cache-dir if given (docs/TIERS.md); default: none")
  p.add_argument("--host-cache-dtype", default="native", choices=("native", "int8", "fp8"),
                 help="how the host tier keeps K/V: the pool's dtype (native), or 8 bits with a "
                      "scale per token and kv head")


def _byte_count(text: str) -> int:
  """'8G', '512M', '1048576' -> bytes (argparse type)."""
  units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  text = text.strip().upper().removesuffix("B").removesuffix("I")
  scale = units.get(text[-1:], 1)
  number = text[:-1] if text[-1:] in units else text
  try:
    value = int(float(number) * scale)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 8G, 512M)") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"a byte count must be >= 0, got {text!r}")
  return value


def _add_generate_parser(sub) -> None:
  g = sub.add_parser("generate", help="run a JSONL file of requests (resumable)",
                     description="Runs every request of a JSONL file and writes one result line "
                                 "per request; rerun the same command to resume. See "
                                 "docs/BATCH.md for both input forms.")
  g.add_argument("--input", required=True, help="requests, one JSON object per line")
  g.add_argument("--output", required=True,
                 help="results JSONL (appended to; the ids already in it are skipped)")
  _add_engine_args(g)
  g.add_argument("--reuse", default="sparsex", choices=REUSE_MODES, help="reuse mode")
  g.add_argument("--ratio", type=float, default=None,
                 help="recompute ratio r (the method's default: 0.15)")
  g.add_argument("--threshold", type=int, default=None,
                 help="layer threshold T (the method's default; CacheBlend's check layer)")
  g.add_argument("--max-new-tokens", type=int, default=64)
  g.add_argument("--temperature", type=float, default=0.0)
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--seed", type=int, default=0,
                 help="job seed; a request without its own seed samples with one derived from "
                      "this and its id")
  g.add_argument("--cache-dir", help="segment cache on disk: loaded on demand, new segments saved")
  g.add_argument("--shared", default="alone", choices=SHARED,
                 help="segments shared by several requests: computed once alone at position 0 "
                      "before them (alone), in context by the first request (context), or as "
                      "they come (off)")
  g.add_argument("--strict", action="store_true",
                 help="a bad segment file in --cache-dir stops the job (default: it is dropped "
                      "with a warning and its segment computed afresh)")
  g.add_argument("--cache-final-message", action="store_true",
                 help="cache the last message of OpenAI chat lines too (default: not cached)")
  rep = g.add_argument_group("engine replicas on Ray (data parallel; docs/BATCH.md)")
  rep.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="run the job on N engine replicas, Ray actors of one GPU each (--tp GPUs "
                        "with --tp), one output written here; default 1: this process, no Ray")
  rep.add_argument("--ray-address", metavar="ADDR",
                   help="run the replicas on this Ray cluster ('auto': the one `ray start` made "
                        "on this machine; ray://HOST:10001); default: a Ray started here")
  rep.add_argument("--routing", default="affinity", choices=ROUTING,
                   help="requests that share segments go to the replica that holds them, within "
                        "a load slack (affinity), or are dealt out blind to the cache "
                        "(round_robin)")
  rep.add_argument("--gpus-per-replica", type=float, metavar="G",
                   help="GPUs per replica (default: --tp, or 1, where the cluster has GPUs; 0.5: "
                        "two replicas per GPU, each limited to a share of its memory)")
  g.add_argument("--errors", help="errors file (default: beside the output, NAME.errors.jsonl)")
  g.add_argument("--summary-json", help="also write the summary as JSON here")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_cache_parser(sub) -> None:
  c = sub.add_parser("cache", help="segment cache on disk: warm, info")
  csub = c.add_subparsers(dest="cache_command", required=True)
  w = csub.add_parser("warm", help="precompute a corpus of passages into a cache dir")
  w.add_argument("--corpus", required=True,
                 help='JSONL, one passage a line: {"text": ...} or {"tokens": [...]} (other '
                      'fields such as "id" and "title" are ignored) or a JSON string')
  w.add_argument("--cache-dir", required=True)
  w.add_argument("--as-message", metavar="ROLE",
                 help="cache each passage as the segment of a chat message with this role (e.g. "
                      "user): what requests that send passages as messages will look up; default: "
                      "the text verbatim")
  _add_engine_args(w)
  w.add_argument("--fill-host-tier", action="store_true",
                 help="then read the cache into the host tier (--host-cache-bytes) up to its "
                      "budget, and report how many segments it holds")
  w.add_argument("--no-progress", action="store_true")
  i = csub.add_parser("info", help="what a cache dir holds")
  i.add_argument("cache_dir")
  i.add_argument("--verify", action="store_true", help="check every file's size and checksum")
  i.add_argument("--repair", action="store_true",
                 help="drop entries whose files are missing, truncated or corrupted")
  i.add_argument("--json", action="store_true", help="print JSON")
  _add_cache_key_arg(i)
  _add_debug_arg(i)


def _free_device_bytes() -> int:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # CPU: free host memory


def _use_compile_cache(args) -> None:
  """Sets up the compile cache on disk (before the process's first compilation: before the
  engine); args.compile_stats then holds (cache dir or None, counters) for the job's last line."""
  from sparsex_jax.entrypoints import compile_cache
  args.compile_stats = compile_cache.enable(
      args.compile_cache, warn=lambda msg: print(f"sparsex: warning: {msg}", file=sys.stderr))


def _build_engine(args):
  """The engine the flags describe (model, dtype, page size, pool size, batch size)."""
  import jax

  if getattr(args, "host_cache_bytes", None):
    # Before anything starts jax's GPU client: it reads the pinned host pool's size once.
    from sparsex_jax.kv.host_tier import reserve_pinned_memory
    reserve_pinned_memory(args.host_cache_bytes)

  import sparsex_jax as sx
  from models.config import get_config
  from models.loaders import load_model, random_model
  from sparsex_jax import sharding
  mesh = sharding.mesh_for(args.tp)
  dtype = args.dtype
  if dtype == "auto":
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if args.page_size < 1 or args.page_size & (args.page_size - 1):
    raise ValueError(f"--page-size must be a power of two, got {args.page_size}")
  if args.batch_size < 1:
    raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.model.startswith("random:"):
    preset = args.model.split(":", 1)[1]
    sharding.check_model(get_config(preset, dtype=dtype), mesh)
    config, params, tokenizer = random_model(
        preset, dtype, byte_tokenizer=getattr(args, "tokenizer", None) == "bytes",
        init_params=None if mesh is None else (
            lambda cfg, seed: sharding.init_params_sharded(cfg, mesh, seed)))
  else:
    if getattr(args, "tokenizer", None) is not None:
      raise ValueError("--tokenizer is for random:PRESET models (a model brings its own)")
    config, params, tokenizer = load_model(args.model, dtype=dtype)
  pool_bytes = None
  if args.pool_gib is not None:
    if args.pool_gib <= 0:
      raise ValueError(f"--pool-gib must be > 0, got {args.pool_gib}")
    pool_bytes = int(args.pool_gib * 2**30)
  elif args.pool_fraction is not None:
    if not 0 < args.pool_fraction <= 1:
      raise ValueError(f"--pool-fraction must be in (0, 1], got {args.pool_fraction}")
    # the pool is split over the tensor axis: each device gives its own free memory
    pool_bytes = int(args.pool_fraction * _free_device_bytes() * sharding.tp_size(mesh))
  return sx.Engine(config, params, tokenizer, page_size=args.page_size,
                   kv_pool_bytes=pool_bytes, max_batch_size=args.batch_size, mesh=mesh,
                   namespace=args.namespace,
                   host_cache_bytes=getattr(args, "host_cache_bytes", None),
                   host_cache_dtype=getattr(args, "host_cache_dtype", "native"),
                   max_prefill_tokens=getattr(args, "max_prefill_tokens",
                                              DEFAULT_MAX_PREFILL_TOKENS) or None)


def _generate(args) -> int:
  import json

  import sparsex_jax as sx
  from sparsex_jax import batch
  if not os.path.exists(args.input):
    raise FileNotFoundError(f"{args.input}: no such input file")
  # Only the flags given: a method that takes no r or T (full, prefix; epic's T) refuses them.
  fields = {name: value for name, value in (("recompute_ratio", args.ratio),
                                            ("layer_threshold", args.threshold))
            if value is not None}
  reuse = sx.ReuseConfig(args.reuse, **fields)
  defaults = batch.Defaults(args.max_new_tokens, args.temperature, args.top_p, args.seed,
                            cache_final_message=args.cache_final_message)
  sx.SamplingParams(defaults.max_new_tokens, defaults.temperature, defaults.top_p, defaults.seed)
  job = dict(reuse=reuse, defaults=defaults, batch_size=args.batch_size, shared=args.shared,
             errors_path=args.errors, progress=not args.no_progress, model_name=args.model)
  replicated = args.replicas != 1 or args.ray_address is not None
  try:
    if replicated:
      from sparsex_jax.batch import replicas
      if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
      try:
        replicas.import_ray()
      except ImportError as e:
        raise batch.JobError(str(e)) from None
      # Each replica builds its engine from these flags, in its own process (_replica_engine).
      summary = replicas.run_replicated_job(
          functools.partial(_replica_engine, args), args.input, args.output,
          replicas=args.replicas, ray_address=args.ray_address,
          gpus_per_replica=args.gpus_per_replica, tp=args.tp or 1, routing=args.routing, **job)
    else:
      engine = _replica_engine(args)
      summary = batch.run_job(engine, args.input, args.output, **job)
  except batch.JobError as e:
    print(f"sparsex: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  print(summary.text(), file=sys.stderr)
  if not replicated:  # the replicas' compilations happen in their own processes
    print(_compile_line(args), file=sys.stderr)
  if args.summary_json:
    with open(args.summary_json, "w", encoding="utf-8") as f:
      json.dump(summary.as_dict(), f, indent=1)
  if summary.interrupted:
    return 130
  return EXIT_FAILED_LINES if summary.failed else 0


def _replica_engine(args):
  """The engine of `sparsex generate`, with its compile cache and cache dir: built in this
  process, or in each replica's (the flags travel to it pickled)."""
  _use_compile_cache(args)
  engine = _build_engine(args)
  if args.cache_dir:
    engine.use_cache_dir(args.cache_dir, key=args.cache_key, strict=args.strict)
  return engine


def _read_corpus(path: str) -> tuple[list, list[str]]:
  """Passages of a corpus file (text or token lists) and one message per bad line."""
  import json
  passages, bad = [], []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError as e:
        bad.append(f"{path}:{n}: not valid JSON ({e})")
        continue
      if isinstance(obj, dict):
        obj = obj.get("text", obj.get("tokens"))
      ok = (isinstance(obj, str) and obj.strip()) or (
          isinstance(obj, list) and obj and all(isinstance(t, int) and t >= 0 for t in obj))
      if not ok:
        bad.append(f"{path}:{n}: a passage needs non-empty \"text\" (or \"tokens\")")
        continue
      passages.append(obj)
  return passages, bad


def _cache(args) -> int:
  return {"warm": _cache_warm, "info": _cache_info}[args.cache_command](args)


def _cache_warm(args) -> int:
  import sparsex_jax as sx
  from sparsex_jax.kv.segment_cache import segment_key
  if not os.path.exists(args.corpus):
    raise FileNotFoundError(f"{args.corpus}: no such corpus file")
  passages, bad = _read_corpus(args.corpus)
  for msg in bad:
    print(msg, file=sys.stderr)
  t0 = time.perf_counter()
  _use_compile_cache(args)
  engine = _build_engine(args)
  disk = engine.use_cache_dir(args.cache_dir, key=args.cache_key)
  if args.as_message:
    if engine.tokenizer is None or any(isinstance(p, list) for p in passages):
      raise ValueError("--as-message needs text passages and a model with a chat template")
    segments = sx.message_segments(engine.tokenizer,
                                   [{"role": args.as_message, "content": p} for p in passages])
  else:
    segments = [sx.Segment(p) for p in passages]
  ids = [engine.tokenize(sx.Request([seg])).segments[0] for seg in segments]
  todo = [seg for seg, i in zip(segments, ids) if segment_key(i, args.namespace) not in disk]
  bar = None
  if not args.no_progress and todo:
    from tqdm import tqdm
    bar = tqdm(total=len(todo), unit="passage", file=sys.stderr, dynamic_ncols=True)
  for i in range(0, len(todo), args.batch_size):
    engine.cache_segments(todo[i:i + args.batch_size], batch_size=args.batch_size)
    if bar is not None:
      bar.update(len(todo[i:i + args.batch_size]))
  if bar is not None:
    bar.close()
  info = disk.info()
  if args.fill_host_tier:
    n_host = engine.fill_host_tier()
    print(f"host tier: {n_host} segments, {engine.host_tier.bytes_used / 2**20:.1f} MiB of "
          f"{engine.host_tier.budget_bytes / 2**20:.1f} MiB", file=sys.stderr)
  print(f"{args.cache_dir}: {len(todo)} passages computed and saved, "
        f"{len(passages) - len(todo)} already cached, {len(bad)} bad lines; the cache now holds "
        f"{info['segments']} segments, {info['tokens']} tokens, {info['bytes'] / 2**20:.1f} MiB "
        f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
  print(_compile_line(args), file=sys.stderr)
  return EXIT_FAILED_LINES if bad else 0


def _compile_line(args) -> str:
  from sparsex_jax.entrypoints import compile_cache
  return compile_cache.describe(*args.compile_stats)


def _cache_info(args) -> int:
  import json

  from sparsex_jax.kv import persist
  if not os.path.isdir(args.cache_dir):
    raise FileNotFoundError(f"{args.cache_dir}: no such cache dir")
  if args.repair:
    for msg in persist.repair(args.cache_dir, args.cache_key):
      print(msg, file=sys.stderr)
    if not os.path.exists(os.path.join(args.cache_dir, persist.INDEX)):
      return 0  # the index was garbage: set aside, the cache starts empty
  info = persist.read_info(args.cache_dir, args.cache_key)
  problems = (persist.check_files(args.cache_dir, args.cache_key)
              if (args.verify or args.repair) else [])
  files = info.pop("files")
  if args.json:
    print(json.dumps(info | {"problems": problems}, indent=1))
  else:
    fp = info["fingerprint"]
    print(f"{info['path']}: {info['segments']} segments, {info['tokens']} tokens, "
          f"{info['bytes'] / 2**20:.1f} MiB on disk ({info['computed_alone']} computed alone, "
          f"{info['segments'] - info['computed_alone']} in context)")
    print(f"model {fp.get('model')}, dtype {fp.get('dtype')}, page size {fp.get('page_size')}, "
          f"weights {fp.get('weights')}, fingerprint {fp.get('digest')}; HMAC {info['hmac']}")
    if files:
      longest = max(files.values(), key=lambda r: r["n_tokens"])
      print(f"segments of {min(r['n_tokens'] for r in files.values())} to "
            f"{longest['n_tokens']} tokens")
    if args.verify or args.repair:
      print("all files verified (size, sha256)" if not problems else
            f"{len(problems)} bad file(s):")
  for msg in problems:
    print(msg, file=sys.stderr)
  return EXIT_FAILED_LINES if problems else 0


if __name__ == "__main__":
  sys.exit(main())
