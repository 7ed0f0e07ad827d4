"""The `sparsex` command line: `sparsex demo` runs the embedded default model on CPU."""

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


def _demo(args) -> int:
  import sparsex_jax as sx

  t0 = time.perf_counter()
  engine = sx.Engine.from_pretrained(args.model)
  load_s = time.perf_counter() - t0
  tok = engine.tokenizer
  # The passage and the question are separate segments: the passage's KV goes to the segment
  # cache, so asking about it again re-uses it.
  messages = [{"role": "user", "content": f"{args.passage}\n\nQuestion: {args.question}"}]
  prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
  head, tail = prompt.split(args.passage, 1)
  request = sx.Request([sx.Segment(head, cache=False), sx.Segment(args.passage),
                        sx.Segment(tail, cache=False)])
  sampling = sx.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
  print(f"model: {engine.config.name} ({engine.config.num_params() / 1e6:.0f}M params), "
        f"loaded in {load_s:.1f} s")
  print(f"passage: {args.passage}\nquestion: {args.question}\n")
  first = engine.generate([request], sampling, reuse=sx.ReuseConfig("full"))[0]
  print(f"answer: {first.text.strip()}")
  print(f"time to first token: {first.stats.ttft_s:.3f} s (full prefill of "
        f"{first.stats.n_prompt} tokens, includes compilation)")
  for label, reuse in (("full prefill, compiled", sx.ReuseConfig("full")),
                       ("sparsex reuse of the passage", sx.ReuseConfig("sparsex"))):
    engine.generate([request], sampling, reuse=reuse)  # warm-up (compiles this shape)
    out = engine.generate([request], sampling, reuse=reuse)[0]
    s = out.stats
    print(f"  {label:30s} ttft {s.ttft_s * 1e3:7.1f} ms  exact {s.n_exact:3d} reused "
          f"{s.n_reused:3d} new {s.n_new:3d} recomputed {s.n_recomputed:3d}  answer: "
          f"{out.text.strip()!r}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="sparsex", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="answer a question about a passage with the default model")
  demo.add_argument("--model", default="smollm2-135m",
                    help="smollm2-135m (embedded), a .gguf file or a Hugging Face folder")
  demo.add_argument("--passage", default=DEMO_PASSAGE)
  demo.add_argument("--question", default=DEMO_QUESTION)
  demo.add_argument("--max-new-tokens", type=int, default=32)
  args = parser.parse_args(argv)
  try:
    return {"demo": _demo}[args.command](args)
  except (ValueError, FileNotFoundError) as e:
    print(f"sparsex: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
