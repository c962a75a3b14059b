"""Orchestration and I/O: the run_job pipeline, data loading, storage, offline assets and the CLI."""
