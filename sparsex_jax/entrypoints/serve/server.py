"""`sparsex serve`: build the engine the flags describe and run the app under uvicorn.

SIGTERM or SIGINT drains: uvicorn stops accepting connections and lets open requests (streams
included) finish, then the engine loop ends and the segment cache is saved to --cache-dir.
"""

from __future__ import annotations

import signal
import sys


def add_arguments(p, add_engine_args) -> None:
  add_engine_args(p)
  from sparsex_jax.reuse import REUSE_MODES
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--served-model-name", help="the model id clients name (default: --model)")
  p.add_argument("--reuse", default="sparsex", choices=REUSE_MODES,
                 help="the server's reuse method; a request may choose another (\"reuse\")")
  p.add_argument("--ratio", type=float, default=None, help="recompute ratio r")
  p.add_argument("--threshold", type=int, default=None, help="layer threshold T")
  p.add_argument("--cache-dir", help="segment cache on disk: loaded on demand, saved as it grows "
                                     "and at shutdown")
  p.add_argument("--max-tokens", type=int, default=256,
                 help="max_tokens of a request that gives none (capped by the context)")
  p.add_argument("--max-waiting", type=int, default=64,
                 help="requests queued beyond the running batch; more get 429 with Retry-After")
  p.add_argument("--request-timeout", type=float, default=None,
                 help="seconds a request may take (default: no limit)")
  p.add_argument("--steps-per-visit", type=int, default=8,
                 help="decode steps per device loop (default 8): a request that arrives waits "
                      "for the loop in flight before its prefill, so fewer steps mean a lower "
                      "TTFT under load for a little more host work per token")
  p.add_argument("--namespace-per-key", action="store_true",
                 help="each API key (Authorization: Bearer KEY) gets its own cache namespace; "
                      "requests without a key are refused (docs/SERVING.md)")


def run(args, build_engine) -> int:
  try:
    import uvicorn
  except ImportError:
    raise ValueError("sparsex serve needs the serve extra: pip install 'sparsex-jax[serve]'") \
        from None

  import sparsex_jax as sx
  from sparsex_jax.entrypoints.serve.app import Server, ServeConfig
  fields = {name: value for name, value in (("recompute_ratio", args.ratio),
                                            ("layer_threshold", args.threshold))
            if value is not None}
  reuse = sx.ReuseConfig(args.reuse, **fields)
  if args.max_tokens < 1 or args.max_waiting < 0:
    raise ValueError("--max-tokens must be >= 1 and --max-waiting >= 0")
  if args.steps_per_visit < 1:
    raise ValueError(f"--steps-per-visit must be >= 1, got {args.steps_per_visit}")
  engine = build_engine(args)
  engine.steps_per_visit = args.steps_per_visit
  policy = reuse.resolve(engine.config)
  if engine.host_tier is not None:  # the server's loads stage one array per K and V
    engine.host_tier.split_layer = policy.layer_threshold
  if args.cache_dir:
    engine.use_cache_dir(args.cache_dir, key=args.cache_key)

  def save():
    if engine.disk_cache is not None:
      n = engine.save_cache()
      print(f"sparsex serve: {n} segments saved to {args.cache_dir}", file=sys.stderr)

  config = ServeConfig(args.served_model_name or args.model, reuse,
                       default_max_tokens=args.max_tokens, max_waiting=args.max_waiting,
                       request_timeout=args.request_timeout,
                       namespace_per_key=args.namespace_per_key)
  server = Server(engine, config, on_shutdown=save)
  # uvicorn catches SIGTERM/SIGINT to drain, then raises the signal again under the handlers it
  # found: with these, a drained server returns and the process exits 0.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  uvicorn.Server(uvicorn.Config(server.app(), host=args.host, port=args.port,
                                log_level="warning", timeout_graceful_shutdown=None)).run()
  return 0 if server.loop.error is None else 1
