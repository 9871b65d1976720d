"""Batch jobs: validated, streamed JSONL input; append-only resumable JSONL output; the summary."""

from moa_local.batch.jsonl import (
           InputRecord,
           ResultWriter,
           finished_ids,
           iter_input,
           read_input,
           validate_input,
)
from moa_local.batch.runner import BatchJob, BatchSummary, prepare_batch, run_batch

__all__ = ["BatchJob", "BatchSummary", "InputRecord", "ResultWriter", "finished_ids", "iter_input", "prepare_batch",
           "read_input", "run_batch", "validate_input"]
