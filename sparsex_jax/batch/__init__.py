"""Offline batch jobs over JSONL (`sparsex generate`), one room per concern:

- formats: the two input line formats (ours and the OpenAI batch form), parse_line, read_requests;
- writer: the crash-safe ResultWriter, the errors file, the result records;
- plan: plan_job, grouping requests that share segments so each is computed once;
- runner: run_job, its Summary, signals and progress.
"""

from sparsex_jax.batch.formats import (Defaults, FailedLine, JobError, JobLine, LineError,
                                       parse_line, read_requests)
from sparsex_jax.batch.plan import SHARED, JobPlan, plan_job
from sparsex_jax.batch.runner import WINDOW_BATCHES, Summary, run_job
from sparsex_jax.batch.writer import (Critical, ResultWriter, apply_stop_strings, errors_path_for,
                                      result_record)

__all__ = ["Critical", "Defaults", "FailedLine", "JobError", "JobLine", "JobPlan", "LineError",
           "ResultWriter", "SHARED", "Summary", "WINDOW_BATCHES", "apply_stop_strings",
           "errors_path_for", "parse_line", "plan_job", "read_requests", "result_record",
           "run_job"]
