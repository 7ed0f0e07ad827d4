"""Offline batch jobs over JSONL (`sparsex generate`), one room per concern:

- formats: the two input line formats (ours and the OpenAI batch form), parse_line, read_requests;
- writer: the crash-safe ResultWriter, the errors file, the result records;
- plan: plan_job, grouping requests that share segments so each is computed once; plan_groups,
  the units a job splits into;
- runner: run_job, the driver's side of a job (Job), its Summary, signals and progress;
- routing: which replica runs which group, cache affinity against load (pure);
- replicas: a job over data-parallel engine replicas on Ray (run_replicated_job, ReplicaPool;
  Ray is imported only when they start).
"""

from sparsex_jax.batch.formats import (Defaults, FailedLine, JobError, JobLine, LineError,
                                       parse_line, read_requests)
from sparsex_jax.batch.plan import SHARED, JobPlan, plan_groups, plan_job
from sparsex_jax.batch.replicas import ReplicaPool, run_replicated_job
from sparsex_jax.batch.routing import ROUTING, Group, Routing, route
from sparsex_jax.batch.runner import WINDOW_BATCHES, Job, Summary, run_job
from sparsex_jax.batch.writer import (Critical, ResultWriter, apply_stop_strings, errors_path_for,
                                      result_record)

__all__ = ["Critical", "Defaults", "FailedLine", "Group", "Job", "JobError", "JobLine", "JobPlan",
           "LineError", "ROUTING", "ReplicaPool", "ResultWriter", "Routing", "SHARED", "Summary",
           "WINDOW_BATCHES", "apply_stop_strings", "errors_path_for", "parse_line", "plan_groups",
           "plan_job", "read_requests", "result_record", "route", "run_job",
           "run_replicated_job"]
