"""How the pipeline starts worker processes: never by forking a process that already runs threads.

On Linux, ``multiprocessing`` forks by default: the child is a copy of the
parent, including every lock, but only the thread that forked survives. If
another thread held a lock at that moment (a Jupyter kernel's threads,
lingua's Rust thread pool, a BLAS pool), the child waits for it forever. The
chapter's notebook runs the pipeline after building a language detector, and
forked workers hung exactly so. ``forkserver`` forks workers from a small
server process started clean, and ``spawn`` starts a fresh interpreter; both
send a worker only what can be pickled (stage names and options, not stage
objects), which is how the runner talks to its workers anyway. Python 3.14
made ``forkserver`` the default on Linux for this reason.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext


def pool_context() -> BaseContext:
    """``forkserver`` where the platform has it (Linux, macOS), else ``spawn`` (Windows)."""
    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
