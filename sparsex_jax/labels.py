"""Labels of a prompt token (RequestPlan.labels): where its K/V comes from. The KV store, the
planner, the reuse methods and the public PrefillPlan all speak them."""

EXACT, REUSED, NEW = 0, 1, 2
