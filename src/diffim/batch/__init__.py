"""Run many science/template pairs: a resumable batch runner with local-process and Dask executors.

``run_batch(pairs, config, outroot)`` runs each pair exactly as ``diffim run`` does, into ``OUTROOT/<id>/``,
one pair per worker process, and keeps ``OUTROOT/manifest.json`` (and ``.parquet``) up to date after every
pair so that an interrupted batch can be resumed. See ``docs/batch.md``.
"""

from __future__ import annotations

from .runner import BatchResult, Pair, config_hash, config_text, read_pairs, run_batch, run_pair

__all__ = ["BatchResult", "Pair", "config_hash", "config_text", "read_pairs", "run_batch", "run_pair"]
