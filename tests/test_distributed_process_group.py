"""Process groups: spawn's results, errors and timeouts, notebook (``__main__``) functions, init_from_env's errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from llmbook.distributed.launcher import RankError, spawn
from llmbook.distributed.process_group import init_from_env
from llmbook.errors import RunError
from llmbook.seeding import DEFAULT_SEED


def _report(rank: int, world_size: int, scale: float) -> dict:
    """What a rank sees: its place, its backend and threads, and an all-reduced tensor."""
    t = torch.full((3,), float(rank + 1)) * scale
    dist.all_reduce(t)
    print(f"hello from {rank}")
    print(f"note from {rank}", file=sys.stderr)
    return {"rank": rank, "world_size": world_size, "backend": dist.get_backend(), "threads": torch.get_num_threads(),
            "dist_rank": dist.get_rank(), "sum": t, "random": torch.rand(2)}


def test_spawn_returns_results_in_rank_order_and_prints_each_rank(capsys):
    results = spawn(_report, 2, 2.0)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["dist_rank"] == r["rank"] and r["world_size"] == 2 for r in results)
    assert all(r["backend"] == "gloo" and r["threads"] == 1 for r in results)
    for r in results:  # (1 + 2) * 2.0 on every rank
        assert torch.equal(r["sum"], torch.full((3,), 6.0))
    expected = torch.rand(2, generator=torch.Generator().manual_seed(DEFAULT_SEED))
    assert all(torch.equal(r["random"], expected) for r in results)  # every rank seeded alike, every run
    shown = capsys.readouterr()
    assert shown.out.splitlines() == ["[rank 0] hello from 0", "[rank 1] hello from 1"]
    assert shown.err.splitlines() == ["[rank 0] note from 0", "[rank 1] note from 1"]
    assert not dist.is_initialized()  # the caller never joins the group


def _fail_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one cannot go on")
    dist.all_reduce(torch.ones(2))  # rank 0 waits for a peer that died: it must not hang the caller


def test_spawn_reraises_a_rank_error_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        spawn(_fail_on_rank_1, 2, timeout_s=60)
    assert time.monotonic() - start < 30
    err = info.value
    assert err.rank == 1 and err.error_type == "ValueError"
    assert str(err).splitlines()[0] == "rank 1 of 2 raised ValueError: rank one cannot go on"
    assert 'raise ValueError("rank one cannot go on")' in err.rank_traceback  # the rank's own frames
    assert "in _fail_on_rank_1" in str(err)


def _die_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(3)  # dies without a Python exception, like a C++ abort or the out-of-memory killer
    dist.all_reduce(torch.ones(2))


def test_spawn_names_a_rank_that_died_without_a_python_error():
    with pytest.raises(RankError) as info:
        spawn(_die_on_rank_1, 2, timeout_s=60)
    assert info.value.rank == 1  # not rank 0, whose all_reduce only lost its peer
    assert str(info.value).startswith("rank 1 of 2 exited with code 3 without a Python error")


def _wait_forever(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.all_reduce(torch.ones(2))  # rank 1 never joins
    time.sleep(600)


def test_spawn_stops_ranks_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish within 3 s") as info:
        spawn(_wait_forever, 2, timeout_s=3)
    assert time.monotonic() - start < 15
    if hasattr(signal, "SIGUSR1"):  # the message shows where each rank was stuck
        text = str(info.value)
        assert "where rank 0 was waiting" in text and "in all_reduce" in text
        assert "dist.all_reduce(torch.ones(2))  # rank 1 never joins" in text


SCRIPT = '''
import torch
import torch.distributed as dist
from llmbook.distributed.launcher import spawn

OFFSET = 100  # a notebook global the function reads


def helper(x):
    return x + OFFSET


def cell_function(rank, world_size, n):
    t = torch.tensor([float(helper(rank))])
    dist.all_reduce(t)
    square = lambda v: v * v
    return rank, square(n), t.item()


print(spawn(cell_function, 2, 3))
'''


@pytest.mark.parametrize("fresh", ["0", "1"], ids=["fork_server", "fresh_interpreters"])
def test_spawn_runs_a_function_defined_in_main_like_a_notebook(tmp_path, fresh):
    """A function whose ``__module__`` is ``__main__`` (a script without a main guard, as in a notebook cell).

    Run both ways ranks can start: forked by the warm server (Linux) and as fresh interpreters (elsewhere).
    """
    script = tmp_path / "notebook_like.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, LLMBOOK_SPAWN_FRESH=fresh)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[(0, 9, 201.0), (1, 9, 201.0)]"


@pytest.mark.parametrize("world_size", [0, -1, 2.0, True, "2", 10_000])
def test_spawn_rejects_a_bad_world_size(world_size):
    with pytest.raises(ValueError, match="world_size") as info:
        spawn(_report, world_size, 1.0)
    assert "\n" not in str(info.value)


def test_spawn_rejects_bad_backend_timeout_and_unpicklable_arguments():
    for kwargs, pattern in [({"backend": "mpi"}, "unknown"), ({"timeout_s": 0}, "timeout_s")]:
        with pytest.raises(ValueError, match=pattern) as info:
            spawn(_report, 2, 1.0, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="cannot send") as info:
        spawn(_report, 2, (x for x in range(3)))  # a generator cannot be pickled
    assert "\n" not in str(info.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            spawn(_report, 2, 1.0, backend="nccl")


def test_init_from_env_errors_are_one_line(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RunError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set.*torchrun") as info:
        init_from_env()
    assert "\n" not in str(info.value)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never reached: each check fails before any connection
    cases = [("mpi", {}, "backend='mpi' is unknown"), ("gloo", {"RANK": "1"}, r"RANK=1 must lie in 0\.\.WORLD_SIZE-1"),
             ("gloo", {"RANK": "zero"}, "RANK='zero' must be an integer")]
    if not torch.cuda.is_available():
        cases.append(("nccl", {}, "backend='nccl' needs CUDA GPUs"))
    for backend, env, pattern in cases:
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            with pytest.raises(ValueError, match=pattern) as info:
                init_from_env(backend)
        assert "\n" not in str(info.value)
    assert not dist.is_initialized()
