"""The pipeline never forks a process that may already run threads (a forked worker can wait forever on a lock)."""

from llmbook.pipeline.processes import pool_context


def test_workers_are_not_forked():
    assert pool_context().get_start_method() in ("forkserver", "spawn")
