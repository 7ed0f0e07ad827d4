"""The `sparsex` command line: `sparsex demo` runs the embedded default model on CPU; `sparsex eval`
runs the evaluation suite (sparsex_jax/evaluation, docs/evaluation.md)."""

from __future__ import annotations

import argparse
import sys
import time

DEMO_PASSAGE = (
    "The Lighthouse of Varnholm was built in 1887 on a granite skerry north of the harbour. "
    "Its keeper for forty years, Ingrid Sol, kept a logbook of every storm, and the lamp was "
    "converted from paraffin to electricity in 1931. Today the tower houses a small museum "
    "about coastal shipping, open from May to September.")
DEMO_QUESTION = "In which year was the lamp of the Lighthouse of Varnholm converted to electricity?"
DEMO_QUESTION2 = "Who kept the logbook of the Lighthouse of Varnholm?"


def _request(tok, passage, question, system=None):
  """A chat turn whose passage is its own (cacheable) segment, cut out of the rendered template."""
  import sparsex_jax as sx
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": f"{passage}\n\nQuestion: {question}"}]
  head, tail = tok.apply_chat_template(messages, add_generation_prompt=True).split(passage, 1)
  return sx.Request([sx.Segment(head, cache=False), sx.Segment(passage),
                     sx.Segment(tail, cache=False)])


def _demo(args) -> int:
  import sparsex_jax as sx

  t0 = time.perf_counter()
  engine = sx.Engine.from_pretrained(args.model)
  tok = engine.tokenizer
  sampling = sx.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
  sparsex = sx.ReuseConfig("sparsex")
  print(f"model: {engine.config.name} ({engine.config.num_params() / 1e6:.0f}M params), "
        f"loaded in {time.perf_counter() - t0:.1f} s, device: {engine.pool['k'].device}")
  print(f"passage: {args.passage}\n")

  # First turn: nothing is cached yet, so this is a full prefill; the passage's KV is stored.
  first = engine.generate([_request(tok, args.passage, args.question)], sampling, sparsex)[0]
  print(f"Q: {args.question}\nA: {first.text.strip()}")
  print(f"time to first token: {first.stats.ttft_s:.3f} s ({first.stats.n_prompt} prompt tokens, "
        f"first call: includes compilation)\n")

  # Second turn, another system prompt: the passage sits at other positions after other
  # context, so SparseX re-rotates its cached KV and recomputes only the important tokens.
  second = _request(tok, args.passage, args.question2, system="You answer in one short sentence.")
  for label, reuse in (("full prefill", sx.ReuseConfig("full")), ("sparsex reuse", sparsex)):
    engine.generate([second], sampling, reuse)  # compiles this shape
    out = engine.generate([second], sampling, reuse)[0]
    s = out.stats
    print(f"{label:13s} ttft {s.ttft_s * 1e3:7.1f} ms | tokens: exact {s.n_exact}, reused "
          f"{s.n_reused}, new {s.n_new}, recomputed {s.n_recomputed}")
    print(f"  Q: {args.question2}\n  A: {out.text.strip()}")
  return 0


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
  ev = sub.add_parser("eval", help="reuse quality of every method on four workloads "
                      "(docs/evaluation.md)")
  from sparsex_jax.evaluation import runner
  runner.add_arguments(ev)
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  for name in ("passage", "question", "question2"):
    if args.command == "demo" and not getattr(args, name).strip():
      print(f"sparsex: error: --{name} must not be empty", file=sys.stderr)
      return 2
  try:
    if args.command == "eval":
      return runner.run(args, argv[1:])
    return {"demo": _demo}[args.command](args)
  except (ValueError, FileNotFoundError) as e:
    print(f"sparsex: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
