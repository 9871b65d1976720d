"""Batch jobs: validated JSONL input, append-only resumable JSONL output, the chunked runner."""

from moa_local.batch.jsonl import InputRecord, ResultWriter, finished_ids, read_input
from moa_local.batch.runner import run_batch

__all__ = ["InputRecord", "ResultWriter", "finished_ids", "read_input", "run_batch"]
