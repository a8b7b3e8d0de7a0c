"""Launch N local ranks from a notebook cell or a test: a tiny ``torchrun``.

:func:`spawn` starts ``world_size`` fresh Python processes on this machine
(loopback only), gives each the same environment torchrun would, runs ``fn(rank, world_size, *args)``
in each and returns the ranks' results in rank order.

Why the ranks are not forks of the caller: a forked child inherits the
parent's threads' locks (a Jupyter kernel runs several threads, PyTorch an
OpenMP pool) and cannot use CUDA once the parent has, so it can deadlock or
fail on a GPU machine. The ranks are forked instead from a small *fork
server*, a process started once that imported torch and then does nothing
else: single-threaded, no CUDA, so its forks are clean, and a rank starts in
milliseconds instead of the seconds an interpreter needs to import torch
(where ``fork`` does not exist, each rank is a fresh interpreter). Neither
can import a function a reader defined in a notebook cell (its
``__module__`` is ``__main__``, which has no file), so the function and its
arguments travel *by value* with ``cloudpickle``; functions from importable
modules travel by reference as usual. The processes meet at a key-value store that this
process hosts on a free port chosen by the operating system, as torchrun's
agent does (``TORCHELASTIC_USE_AGENT_STORE``), so no port can be taken
between choosing it and using it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import linecache
import operator
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from llmbook.distributed.process_group import check_backend, init_from_env, require_distributed
from llmbook.seeding import DEFAULT_SEED, seed_everything

DEFAULT_TIMEOUT_S = 120.0


class RankError(RuntimeError):
    """A rank started by :func:`spawn` failed; ``rank`` says which, ``rank_traceback`` holds its traceback text.

    The first line of the message names the rank and its error; the rank's own
    traceback follows, because the frames that matter ran in another process.
    """

    def __init__(self, message: str, rank: int, error_type: str, rank_traceback: str):
        super().__init__(message)
        self.rank, self.error_type, self.rank_traceback = rank, error_type, rank_traceback


def _to_cpu(obj: Any) -> Any:
    """Move tensors in (nested) lists, tuples and dicts to the CPU, so the caller never touches a rank's GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, list):
        return [_to_cpu(x) for x in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # the parent never reads a half-written file


def _worker_main(workdir: str, backend: str) -> None:
    """Entry point of one spawned rank: join the group, run the function, write its result or its error."""
    import cloudpickle

    rank = int(os.environ["RANK"])
    out = Path(workdir) / f"rank{rank}.pkl"
    try:
        torch.set_num_threads(1)  # p ranks share the cores; more threads only contend
        torch.set_num_interop_threads(1)
        if hasattr(signal, "SIGUSR1"):  # on a timeout spawn asks for the Python stack: where was this rank stuck?
            faulthandler.register(signal.SIGUSR1, all_threads=False)
        seed_everything(DEFAULT_SEED, deterministic=False)  # a fresh process is seeded at random otherwise
        fn, args = pickle.loads((Path(workdir) / "payload.pkl").read_bytes())
        import torch.distributed as dist

        _, world_size = init_from_env(backend)
        result = _to_cpu(fn(rank, world_size, *args))
        data = cloudpickle.dumps(("ok", result))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 -- every failure must reach the caller, SystemExit included
        frames = exc.__traceback__.tb_next or exc.__traceback__  # drop this wrapper's own frame
        tb = "".join(traceback.format_exception(type(exc), exc, frames))
        report = ("error", type(exc).__name__, str(exc), tb, time.time())
        _write(out, pickle.dumps(report))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip destroy/atexit: the other ranks may be stuck in a collective with us
    _write(out, data)


def _check_world_size(world_size: Any) -> int:
    try:
        count = operator.index(world_size)  # ints and NumPy integers; not 2.0 or "2"
    except TypeError:
        count = 0
    if isinstance(world_size, bool) or count < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive integer (the number of ranks to start)")
    world_size = count
    cores = os.cpu_count() or 1
    limit = max(64, 4 * cores)
    if world_size > limit:
        raise ValueError(f"world_size={world_size} is too many processes for {cores} CPU cores; use at most {limit}")
    return world_size


def _child_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    paths = [os.getcwd() if p == "" else p for p in sys.path]
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",  # every rank is a client of the store this process hosts
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1",
    )
    return env


def _tail(path: Path, n: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-n:]


def _echo_output(workdir: Path, world_size: int, stderr: bool = True) -> None:
    """Show what each rank printed, each line prefixed with its rank, in rank order (deterministic in a notebook).

    Standard output goes to ``sys.stdout``, then standard error (warnings) to
    ``sys.stderr`` unless ``stderr=False`` (on a failure the exception carries it).
    """
    streams = (("out", sys.stdout), ("err", sys.stderr)) if stderr else (("out", sys.stdout),)
    for suffix, stream in streams:
        for rank in range(world_size):
            for line in _tail(workdir / f"rank{rank}.{suffix}", 100_000).splitlines():
                print(f"[rank {rank}] {line}", file=stream)


def _failure(workdir: Path, procs: list[subprocess.Popen], world_size: int, fn: Any, killed: set[int]) -> RankError:
    """The error of the rank that failed first; the others usually fail *because* it did.

    A rank that died without a Python error (a signal: a C++ abort, the
    out-of-memory killer) comes first: its peers then only report a lost
    connection. Otherwise the earliest Python error wins.
    """
    reports = []
    for rank in range(world_size):
        path = workdir / f"rank{rank}.pkl"
        if path.exists():
            report = pickle.loads(path.read_bytes())
            if report[0] == "error":
                reports.append((report[4], rank, report))
    reported = {rank for _, rank, _ in reports}
    for rank, proc in enumerate(procs):
        if proc.returncode not in (0, None) and rank not in killed and rank not in reported:
            err = _tail(workdir / f"rank{rank}.err")
            code = proc.returncode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            last = err.strip().splitlines()[-1] if err.strip() else "(nothing on stderr)"
            text = f"rank {rank} of {world_size} {how} without a Python error; its stderr ends: {last}\n\n{err}"
            return RankError(text, rank, "exit", err)
    if reports:
        _, rank, (_, kind, message, tb, _) = min(reports)
        tb = _restore_filenames(tb, fn)
        first = message.strip().splitlines()[0] if message.strip() else ""
        text = f"rank {rank} of {world_size} raised {kind}: {first}\n\n--- traceback of rank {rank} ---\n{tb}"
        return RankError(text, rank, kind, tb)
    return RankError(f"a rank of {world_size} failed without a report", -1, "exit", "")


def _code_objects(fn: Any) -> dict[str, Any]:
    """Code objects of ``fn`` and of the functions it calls by global name, with their nested functions, by name."""
    found: dict[str, list] = {}
    todo = [getattr(fn, "__code__", None)]
    scope = getattr(fn, "__globals__", {})
    todo += [getattr(v, "__code__", None) for v in scope.values() if getattr(v, "__module__", None) == "__main__"]
    while todo:
        code = todo.pop()
        if code is None or not hasattr(code, "co_consts"):
            continue
        found.setdefault(code.co_name, []).append(code)
        todo += [c for c in code.co_consts if hasattr(c, "co_consts")]
    return {name: codes[0] for name, codes in found.items() if len({c.co_filename for c in codes}) == 1}


def _restore_filenames(tb: str, fn: Any) -> str:
    """Put back the file names and source lines that by-value pickling hides (it ships code as ``<dynamic-code>``)."""
    codes = _code_objects(fn)

    def fix(match: re.Match) -> str:
        line, name = int(match.group(1)), match.group(2)
        code = codes.get(name)
        if code is None:
            return match.group(0)
        source = linecache.getline(code.co_filename, line).strip()
        return f'  File "{code.co_filename}", line {line}, in {name}' + (f"\n    {source}" if source else "")

    return re.sub(r'  File "<dynamic-code>", line (\d+),? in (\S+)', fix, tb)  # traceback or faulthandler


def _with_source(stack: str) -> str:
    """Write faulthandler's frames like a traceback's, with their source lines (faulthandler prints none)."""

    def fix(match: re.Match) -> str:
        path, line, name = match.group(1), int(match.group(2)), match.group(3)
        source = linecache.getline(path, line).strip()
        return f'  File "{path}", line {line}, in {name}' + (f"\n    {source}" if source else "")

    return re.sub(r'  File "([^"]+)", line (\d+) in (\S+)', fix, stack)


def _stacks(workdir: Path, procs: list[subprocess.Popen], fn: Any) -> str:
    """Ask the ranks still running for their Python stacks (faulthandler, POSIX only), stop all, return the stacks."""
    alive = [rank for rank, proc in enumerate(procs) if proc.poll() is None]
    if hasattr(signal, "SIGUSR1") and alive:
        for rank in alive:
            procs[rank].send_signal(signal.SIGUSR1)
        time.sleep(0.5)
    _stop(procs)
    text = ""
    for rank in alive:
        err = _tail(workdir / f"rank{rank}.err")
        if "most recent call first" in err:
            stack = err[err.rfind("\n", 0, err.rindex("most recent call first")) + 1:]  # the last dump
            stack = _with_source(_restore_filenames(stack.strip(), fn))
            text += f"\n\n--- where rank {rank} was waiting (most recent call first) ---\n{stack}"
    return text


def _stop(procs: list[subprocess.Popen]) -> set[int]:
    """Kill the ranks still running and wait for all; return the ranks this call killed."""
    killed = set()
    for rank, proc in enumerate(procs):
        if proc.poll() is None:
            proc.kill()
            killed.add(rank)
    for proc in procs:
        proc.wait()
    return killed


# A warm fork server (Linux): starting a fresh interpreter and importing torch costs
# seconds per rank; forking a process that already imported torch costs milliseconds.
# The server is single-threaded and has never run a parallel torch op nor touched
# CUDA, so a fork of it is as clean as a fresh process; it runs until the process
# that started it exits (its stdin closes). Elsewhere, or with LLMBOOK_SPAWN_FRESH=1,
# every rank is a fresh interpreter.
_SERVER: subprocess.Popen | None = None
_SERVER_READY = b"ready\n"
_SERVER_LOCK = threading.Lock()


def _read_exactly(fd: int, n: int) -> bytes:
    """``n`` bytes from ``fd``, fewer only at end of file."""
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _serve() -> None:
    """The fork server's loop: for each request, fork a rank; reap ranks and write their exit codes."""
    import select
    import struct

    import cloudpickle  # noqa: F401 -- preloaded for the ranks
    import torch._dynamo  # noqa: F401 -- a rank's first optimizer imports it: 2 s per rank otherwise
    import torch.distributed  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401 -- FSDP2 and DCP: 1.5-4 s per rank otherwise
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    if len(os.listdir("/proc/self/task")) != 1:  # a thread would make fork unsafe: refuse, spawn falls back
        return
    replies = sys.stdout.buffer
    replies.write(_SERVER_READY)
    replies.flush()
    running: dict[int, Path] = {}
    while True:
        ready, _, _ = select.select([0], [], [], 0.005)  # fd 0 read unbuffered, so select sees every byte
        while running:  # reap finished ranks; their exit codes go where spawn looks for them
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            path = running.pop(pid, None)
            if path is not None:
                with contextlib.suppress(OSError):
                    _write(path, str(os.waitstatus_to_exitcode(status)).encode())
        if not ready:
            continue
        header = _read_exactly(0, 4)
        if len(header) < 4:
            return  # the process that started us is gone
        request = pickle.loads(_read_exactly(0, struct.unpack(">I", header)[0]))
        pid = os.fork()
        if pid == 0:
            _forked_rank(request)
        running[pid] = Path(request["workdir"]) / f"rank{request['rank']}.exit"
        replies.write(struct.pack(">q", pid))
        replies.flush()


def _forked_rank(request: dict) -> None:
    """In the forked child: become the rank the request describes, run it, never return into the server loop."""
    code = 1
    try:
        workdir, rank = Path(request["workdir"]), request["rank"]
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, workdir / f"rank{rank}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, workdir / f"rank{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            new = os.open(path, flags, 0o600)
            os.dup2(new, fd)
            os.close(new)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = request["path"]
        _worker_main(str(workdir), request["backend"])
        code = 0
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _server() -> subprocess.Popen | None:
    """This process's fork server, started on first use; None where ranks must be fresh interpreters."""
    global _SERVER
    if sys.platform != "linux" or os.environ.get("LLMBOOK_SPAWN_FRESH") == "1":
        return None
    if _SERVER is not None and _SERVER.poll() is None:
        return _SERVER
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(os.getcwd() if p == "" else p for p in sys.path))
    code = "from llmbook.distributed.launcher import _serve; _serve()"
    server = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    if server.stdout.readline() != _SERVER_READY:  # refused (threads) or failed to start: use fresh processes
        server.kill()
        server.wait()
        os.environ["LLMBOOK_SPAWN_FRESH"] = "1"
        return None
    _SERVER = server
    return server


class _ForkedRank:
    """A rank forked by the server, with the part of ``subprocess.Popen``'s interface that spawn uses."""

    def __init__(self, pid: int, exit_path: Path):
        self.pid, self.exit_path, self.returncode = pid, exit_path, None

    def poll(self) -> int | None:
        if self.returncode is None and self.exit_path.exists():
            self.returncode = int(self.exit_path.read_text())
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        deadline = time.monotonic() + 10  # the server reaps within milliseconds; never wait forever on it
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if self.returncode is None:
            self.returncode = -signal.SIGKILL
        return self.returncode


def _launch(workdir: Path, rank: int, code: str, backend: str, env: dict[str, str]) -> Any:
    """Start one rank: forked by the warm server where there is one, else a fresh interpreter."""
    import struct

    with _SERVER_LOCK:  # one request and its reply at a time, even from several threads
        server = _server()
        if server is not None:
            request = {"workdir": str(workdir), "rank": rank, "backend": backend, "env": env, "cwd": os.getcwd(),
                       "path": [os.getcwd() if p == "" else p for p in sys.path]}
            data = pickle.dumps(request)
            try:
                server.stdin.write(struct.pack(">I", len(data)) + data)
                server.stdin.flush()
                reply = server.stdout.read(8)
            except OSError:
                reply = b""
            if len(reply) == 8:
                return _ForkedRank(struct.unpack(">q", reply)[0], workdir / f"rank{rank}.exit")
            server.kill()  # the server died: this rank and later ones start fresh (a new server next spawn)
    with open(workdir / f"rank{rank}.out", "wb") as out, open(workdir / f"rank{rank}.err", "wb") as err:
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local ranks and return their results in rank order.

    Each rank is a fresh Python process with its process group initialised
    (``backend``, loopback) before ``fn`` runs and destroyed after, and one
    torch thread. ``fn`` may be defined in a notebook cell. Results come back
    pickled (tensors moved to the CPU); what a rank prints (and warns) is
    shown here after all ranks finish, each line prefixed with ``[rank r]``.
    If a rank raises, the others are stopped and :class:`RankError` names the rank and its
    error and carries its traceback; after ``timeout_s`` seconds all ranks are
    stopped and ``TimeoutError`` is raised, so a mismatched collective never
    hangs the caller, and the message shows where each rank was waiting.

    Every rank starts seeded with ``seed_everything()`` (Python, NumPy,
    PyTorch; the book's default seed), the same on all ranks and in every run,
    so models built in ``fn`` start equal on all ranks, as DDP needs; seed
    with the rank inside ``fn`` where ranks must differ (their data, dropout).
    """
    import cloudpickle

    world_size = _check_world_size(world_size)
    require_distributed()
    check_backend(backend)
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ValueError(f"world_size={world_size} with nccl needs as many GPUs; {torch.cuda.device_count()} visible")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
    try:
        payload = cloudpickle.dumps((fn, args))
    except Exception as exc:  # noqa: BLE001 -- anything unpicklable gets the same one-line advice
        raise ValueError(
            f"spawn cannot send {getattr(fn, '__name__', fn)!r} or its arguments to the ranks ({type(exc).__name__}: "
            f"{exc}); pass tensors, numbers and plain containers, and create models inside the function"
        ) from None

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="llmbook_spawn_") as tmp:
        workdir = Path(tmp)
        (workdir / "payload.pkl").write_bytes(payload)
        code = f"from llmbook.distributed.launcher import _worker_main; _worker_main({tmp!r}, {backend!r})"
        try:
            for rank in range(world_size):
                procs.append(_launch(workdir, rank, code, backend, _child_env(rank, world_size, store.port)))
            deadline = time.monotonic() + timeout_s
            while True:
                codes = [proc.poll() for proc in procs]
                if any(c not in (None, 0) for c in codes):
                    killed = _stop(procs)
                    _echo_output(workdir, world_size, stderr=False)
                    raise _failure(workdir, procs, world_size, fn, killed)
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    waiting = [r for r, c in enumerate(codes) if c is None]
                    stacks = _stacks(workdir, procs, fn)
                    _echo_output(workdir, world_size, stderr=False)
                    raise TimeoutError(
                        f"spawn: ranks {waiting} of {world_size} did not finish within {timeout_s:g} s and were "
                        "stopped; a rank may wait in a collective another rank never called "
                        "(pass timeout_s=... if the work is only slow)" + stacks
                    )
                time.sleep(0.01)
        finally:
            _stop(procs)
            del store
        _echo_output(workdir, world_size)
        results = []
        for rank in range(world_size):
            path = workdir / f"rank{rank}.pkl"
            if not path.exists():
                raise RankError(f"rank {rank} of {world_size} exited without a result", rank, "exit",
                                _tail(workdir / f"rank{rank}.err"))
            results.append(pickle.loads(path.read_bytes())[1])
    return results
