"""Run untrusted program-of-thought (PoT) programs and read their numeric answer.

    from mdlite.sandbox import run_program, run_programs
    run_program("def solution():\\n    return 3 / 4").value               # 0.75
    [r.error for r in run_programs(["while True: pass", "ans = 5"])]    # ['timeout', None]

The answer is the return value of `solution()` when the program defines it, else its variable `ans`
or `answer`, else the last line it printed; `extract_number` turns it into a finite float or None (see
there which values count).

Warm workers (`python -I`, empty environment, ALLOWED_MODULES pre-imported, in an empty network
namespace when the kernel allows) fork one child per program; programs that mention numpy or sympy
go to workers that pre-imported them, the rest to lean ones that fork faster. The child gets its own
process group, a fresh temporary working directory (removed afterwards), an empty environment,
/dev/null as fds 0-2 with `print` captured, RLIMIT_CPU/AS/FSIZE/CORE/NPROC and no-new-privileges.
Under root it also becomes uid `nobody`, so the kernel refuses it forks, threads, signals to other
users' processes and writes to what nobody does not own. Inside, an audit hook refuses sockets,
processes, ctypes, signals, object-graph introspection, changing function code, chdir, directory fds,
writes outside the temp dir and reads outside it and the Python installation; a restricted
`__import__` admits ALLOWED_MODULES only. The worker kills the child's process group at the timeout.

Not covered: the hook and the import whitelist are in-process policy that a determined program can
get around (`print.__self__.__import__` reaches any module; `_posixsubprocess` forks unaudited), so
the OS layer is the boundary; without root the child keeps the caller's uid, and as nobody it could
still create files in world-writable dirs (/tmp, /dev/shm) if it got past the hook. `os.stat` of any
path, and CPU, disk bandwidth and file count in the temp dir within the timeout are not limited.
"""

from __future__ import annotations

import atexit
import builtins
import ctypes
import gc
import io
import json
import logging
import math
import numbers
import os
import queue
import resource
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from types import FunctionType, MappingProxyType
from typing import Any, NoReturn

logger = logging.getLogger(__name__)

STDOUT_CAP = 16_384  # characters of printed output kept per program
FSIZE_MB = 16  # largest file a program may write in its temp dir
ALLOWED_MODULES = frozenset(
    "array bisect calendar cmath collections copy dataclasses datetime decimal enum fractions functools heapq "
    "itertools math mpmath numbers numpy operator random re statistics string sympy time typing".split()
)
_KINDS = {"plain": (), "numpy": ("numpy",), "sympy": ("numpy", "sympy")}  # worker kind -> pre-imported extras
_DENIED = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
           "os.system", "os.kill", "os.killpg", "os.symlink", "os.link", "os.setuid", "pty.", "resource.",
           "gc.get_", "signal.", "sys._current_frames", "sys.setprofile", "sys.settrace", "os.chdir", "sqlite3.")
# C modules that create files without an "open" audit event (dbm, shared memory, semaphores, ...)
_NO_IMPORT = frozenset("_dbm _gdbm dbm _sqlite3 sqlite3 _posixshmem _multiprocessing multiprocessing readline _curses "
                       "curses _ssl ssl _tkinter".split())
_WRITES = {  # audit event that changes files -> (positions of its path arguments, positions of dir_fd arguments)
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)), "os.rename": ((0, 1), (2, 3)),
    "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
    "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)), "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ())}
_NOBODY = 65534
_BOOT = ("import importlib.util as u, sys; s = u.spec_from_file_location('_mdlite_sandbox', sys.argv[1]); "
         "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); m._worker_main(sys.argv[2])")


@dataclass(frozen=True)
class ProgramResult:
    """What running one program gave: `ok` iff `value` is a finite number; else `error` says why."""

    ok: bool
    value: float | None
    error: str | None  # "timeout", "memory", "no answer", "NameError: ...", "exit status 3", ...
    stdout: str  # the first STDOUT_CAP characters the program printed


def run_program(code: str, *, timeout: float = 2.0, memory_mb: int = 256) -> ProgramResult:
    """Run one program in the sandbox (see the module docstring). Never raises for program behaviour."""
    return _get_pool(None).map([code], timeout, memory_mb)[0]


def run_programs(
    codes: Sequence[str], *, timeout: float = 2.0, memory_mb: int = 256, workers: int | None = None
) -> list[ProgramResult]:
    """Run programs in parallel on `workers` processes (default: the current pool's, else os.cpu_count()).

    Results come in the order of `codes`. `timeout` is wall-clock (and CPU) seconds per program,
    `memory_mb` the address space a program may add to its warm worker's.
    """
    return _get_pool(workers).map(list(codes), timeout, memory_mb)


def isolation() -> tuple[str, bool]:
    """How programs are isolated on this machine, in words, from a lean worker's own report, and whether the OS
    cuts them off from the network (the audit hook alone can be got around). MdliteError when no worker starts."""
    worker = _Worker("plain")
    try:
        report = worker.ready()
    finally:
        worker.close()
    user = "as user nobody" if report["nobody"] else "as the server's own user (it is not root)"
    network = "in an empty network namespace" if report["network_namespace"] else \
        "with the host's network (no network namespace here: only the audit hook refuses sockets)"
    return f"{user}, {network}, under rlimits and an audit hook", report["network_namespace"]


def extract_number(value: object) -> float | None:
    """A finite float from a program's answer, or None.

    Numbers: int, float, Fraction, Decimal, numpy (np.longdouble too) and sympy numbers. By choice, also: a
    one-element list, tuple or numpy array is its element; a string is read like printed output (its last
    line a number: "42", "3/4", "1,000"); a complex number without imaginary part (cmath.sqrt(16)) is its
    real part. Anything else (bool, None, other text, longer sequences, NaN, infinities) is None.
    """
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        value = _parse_number(value)
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        return None
    module = type(value).__module__.split(".")[0]
    if module == "numpy" and getattr(value, "size", None) == 1 and hasattr(value, "dtype"):
        if value.dtype.kind not in "iufc":
            return None
        value = value.ravel()[0]  # numpy scalars and one-element arrays; no .item(): np.longdouble stays numpy
        value = complex(value) if value.dtype.kind == "c" else float(value)
    if isinstance(value, complex):
        value = value.real if value.imag == 0 else None
    if module == "sympy" and getattr(value, "is_number", False) is not True:
        return None
    if module != "sympy" and not isinstance(value, (numbers.Real, Decimal)):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, ArithmeticError):
        return None
    return number if math.isfinite(number) else None


# ---------------------------------------------------------------- parent side: the pool


class _WorkerDied(Exception):
    pass


class _Worker:
    """One warm worker process, spoken to with one JSON line per request and per reply."""

    def __init__(self, kind: str) -> None:
        self.kind, self.buf = kind, b""
        env = {"PATH": os.defpath, "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOT, os.path.abspath(__file__), kind], cwd="/",
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)

    def ready(self) -> dict[str, Any]:
        """The worker's report once it has started: its kind and isolation (see _worker_main)."""
        try:
            report = self._reply(time.monotonic() + 120)
            logger.debug("sandbox worker %d: %s", self.proc.pid, report)
            return report
        except (_WorkerDied, ValueError):
            from mdlite import MdliteError

            raise MdliteError(f"the PoT sandbox's worker did not start; `{sys.executable} -I -c 'import "
                              f"{', '.join(('math',) + _KINDS[self.kind])}'` shows why") from None

    def run(self, code: str, timeout: float, memory_mb: int) -> ProgramResult:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"code": code, "timeout": timeout, "memory_mb": memory_mb}).encode())
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise _WorkerDied(str(e)) from e
        reply = self._reply(time.monotonic() + timeout + 30)
        return ProgramResult(bool(reply["ok"]), reply["value"], reply["error"], reply["stdout"])

    def _reply(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self.buf:
            chunk = _read(self.proc.stdout.fileno(), deadline)
            if not chunk:
                raise _WorkerDied("no reply")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe:
                    pipe.close()  # end of input: the worker exits
            except OSError:  # a dead worker's stdin cannot flush
                pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Pool:
    """`size` threads; each program takes an idle worker of its kind, started `size` at a time on first use."""

    def __init__(self, size: int) -> None:
        self.size, self.lock = size, threading.Lock()
        self.workers: list[_Worker] = []
        self.idle: dict[str, queue.SimpleQueue[_Worker]] = {}
        self.executor = ThreadPoolExecutor(size, thread_name_prefix="mdlite-sandbox")

    def map(self, codes: list[str], timeout: float, memory_mb: int) -> list[ProgramResult]:
        return list(self.executor.map(lambda code: self._run(code, timeout, memory_mb), codes))

    def _run(self, code: str, timeout: float, memory_mb: int) -> ProgramResult:
        kind = "sympy" if "sympy" in code or "mpmath" in code else "numpy" if "numpy" in code else "plain"
        with self.lock:
            if kind not in self.idle:
                self.idle[kind] = self._start(kind)
        worker = self.idle[kind].get()
        try:
            for _ in range(2):  # a dead or stuck worker is replaced and the program retried once
                try:
                    return worker.run(code, timeout, memory_mb)
                except (_WorkerDied, ValueError, KeyError) as e:
                    logger.warning("sandbox worker %d failed (%s); starting a new one", worker.proc.pid, e)
                    worker.close(kill=True)
                    new = _Worker(kind)
                    self.workers[self.workers.index(worker)] = worker = new
                    worker.ready()
            return ProgramResult(False, None, "sandbox failure", "")
        finally:
            self.idle[kind].put(worker)

    def _start(self, kind: str) -> queue.SimpleQueue[_Worker]:
        started = [_Worker(kind) for _ in range(self.size)]
        idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        try:
            for worker in started:  # all were started first, so they import in parallel
                worker.ready()
                idle.put(worker)
        except BaseException:
            for worker in started:
                worker.close(kill=True)
            raise
        self.workers += started
        return idle

    def close(self) -> None:
        self.executor.shutdown()
        for worker in self.workers:
            worker.close()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _get_pool(workers: int | None) -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or (workers is not None and workers != _POOL.size):
            if _POOL is not None:
                _POOL.close()
            _POOL = _Pool(workers or os.cpu_count() or 1)
        return _POOL


@atexit.register
def _close_pool() -> None:
    if _POOL is not None:
        _POOL.close()


# ---------------------------------------------------------------- worker side (a separate process)


_LIBC = ctypes.CDLL(None, use_errno=True)
_CAP_HEADER = (ctypes.c_uint32 * 2)(0x20080522, 0)  # capset(2) version 3, this process
_CAP_READ = (ctypes.c_uint32 * 6)(4, 4, 0, 0, 0, 0)  # CAP_DAC_READ_SEARCH effective and permitted
_CAP_NONE = (ctypes.c_uint32 * 6)()


def _worker_main(kind: str) -> NoReturn:
    requests, replies = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    for name in sorted(ALLOWED_MODULES - {"numpy", "sympy", "mpmath"}) + list(_KINDS[kind]):
        try:
            __import__(name)
        except ImportError:  # numpy or sympy not installed: programs importing them will fail
            pass
    gc.collect()
    gc.freeze()  # the garbage collector will not touch (and so copy) the pre-imported objects in children
    paths = sysconfig.get_paths()
    roots = tuple({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    root = os.geteuid() == 0
    keep_read = root and not all(_world_readable(path) for path in roots)
    # an empty network namespace for the worker and its children; without root, inside a user namespace
    uid, gid, netns = os.getuid(), os.getgid(), _LIBC.unshare(0x40000000 if root else 0x50000000) == 0
    if netns and not root:  # map our own ids, or files we create would belong to nobody
        for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _send(replies, {"kind": kind, "network_namespace": netns, "nobody": root, "keep_read": keep_read})
    with os.fdopen(requests, "rb") as lines:
        for line in lines:
            request = json.loads(line)
            try:
                reply = _run_one(request["code"], request["timeout"], request["memory_mb"], roots, root, keep_read)
            except Exception as e:  # noqa: BLE001 - a worker problem becomes that program's error
                reply = {"ok": False, "value": None, "error": f"sandbox: {e}"[:200], "stdout": ""}
            _send(replies, reply)
    os._exit(0)


def _run_one(code: str, timeout: float, memory_mb: int, roots: tuple[str, ...], root: bool,
             keep_read: bool) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="mdlite-pot-")
    read_end, write_end = os.pipe()
    try:
        if root:
            os.chown(tmp, _NOBODY, _NOBODY)
        with open("/proc/self/statm") as f:  # the child starts as a copy of this process
            address_space = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + (memory_mb << 20)
        pid = os.fork()
        if pid == 0:
            _child(code, tmp, timeout, address_space, write_end, roots, root, keep_read)
        os.close(write_end)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass  # the child did it already, or is gone
        data, deadline = b"", time.monotonic() + timeout
        while len(data) < (1 << 20) and (chunk := _read(read_end, deadline)):
            data += chunk
        timed_out = time.monotonic() >= deadline
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        _, status, usage = os.wait4(pid, 0)
    finally:
        os.close(read_end)
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        reply = _checked(json.loads(data))
    except ValueError:
        reply = None
    if reply:
        return reply
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    if timed_out or sig == signal.SIGXCPU or sig == signal.SIGKILL and usage.ru_utime + usage.ru_stime > timeout:
        error = "timeout"
    else:
        error = f"killed by {signal.Signals(sig).name}" if sig else f"exit status {os.waitstatus_to_exitcode(status)}"
    return {"ok": False, "value": None, "error": "no answer" if status == 0 else error, "stdout": ""}


def _checked(reply: Any) -> dict[str, Any] | None:
    """The child's reply, if it has the expected shape and types (the program could have written its own)."""
    if not isinstance(reply, dict) or set(reply) != {"ok", "value", "error", "stdout"}:
        return None
    value, error, stdout = reply["value"], reply["error"], reply["stdout"]
    if type(value) not in (int, float, type(None)) or type(error) not in (str, type(None)) or type(stdout) is not str:
        return None
    value = extract_number(value)  # also drops NaN and infinities, which JSON lets through
    error = None if value is not None else (error or "no answer")[:200]
    return {"ok": value is not None, "value": value, "error": error, "stdout": stdout[:STDOUT_CAP]}


def _child(code: str, tmp: str, timeout: float, address_space: int, out_fd: int, roots: tuple[str, ...],
           root: bool, keep_read: bool) -> NoReturn:
    try:
        os.setpgid(0, 0)
        os.chdir(tmp)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, out_fd)
        os.closerange(out_fd + 1, os.sysconf("SC_OPEN_MAX"))
        os.environ.clear()
        os.environ.update(HOME=tmp, TMPDIR=tmp)
        tempfile.tempdir = tmp
        if root:  # become nobody, keeping CAP_DAC_READ_SEARCH only when the Python installation is private
            _LIBC.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
            if _LIBC.capset(_CAP_HEADER, _CAP_READ if keep_read else _CAP_NONE):
                raise OSError(ctypes.get_errno(), "capset")
        _LIBC.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        _LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the worker
        cpu = max(1, math.ceil(timeout))
        for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (address_space,) * 2),
                             (resource.RLIMIT_FSIZE, (FSIZE_MB << 20,) * 2), (resource.RLIMIT_CORE, (0, 0)),
                             (resource.RLIMIT_NPROC, (0, 0))):
            resource.setrlimit(limit, value)
        sys.dont_write_bytecode = True
        sys.stdout = sys.stderr = out = _CappedWriter()
        sys.addaudithook(_make_hook(tmp, roots))
        reply = _execute(code, out)
    except BaseException as e:  # noqa: BLE001 - setting up the child failed
        reply = {"ok": False, "value": None, "error": f"sandbox: {type(e).__name__}: {e}"[:200], "stdout": ""}
    try:
        _send(out_fd, reply)
    finally:
        os._exit(0)


def _execute(code: str, out: _CappedWriter) -> dict[str, Any]:
    """Run `code` in a fresh namespace with the restricted import; the answer or the error, never raises."""
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": _BUILTINS}
    try:
        try:
            exec(compile(code, "<program>", "exec"), namespace)
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        if callable(namespace.get("solution")):
            answer = namespace["solution"]()
        elif "ans" in namespace or "answer" in namespace:
            answer = namespace.get("ans", namespace.get("answer"))
        else:
            answer = _parse_number(out.tail)
        value = extract_number(answer)
        error = None if value is not None else "no answer"
    except MemoryError:
        value, error = None, "memory"
    except BaseException as e:  # noqa: BLE001 - whatever the program raised
        value, error = None, type(e).__name__
        try:
            error = f"{error}: {e}" if str(e) else error
        except BaseException:  # noqa: BLE001 - even str() of it failed
            pass
    return {"ok": value is not None, "value": value, "error": error and error[:200], "stdout": out.text()}


def _parse_number(text: str) -> float | None:
    lines = text.strip().splitlines()
    try:
        return float(Fraction(lines[-1].strip().replace(",", ""))) if lines else None
    except (ValueError, ArithmeticError):
        return None


def _import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
    if level or name.partition(".")[0] not in ALLOWED_MODULES:
        raise ImportError(f"import of {name!r} is not allowed in the sandbox")
    return __import__(name, globals, locals, fromlist, level)


_BUILTINS = dict(vars(builtins), __import__=_import)  # a program may change it: it runs in its own process


def _make_hook(tmp: str, roots: tuple[str, ...]) -> Callable[[str, tuple[Any, ...]], None]:
    """The audit hook. All it uses is an immutable default, so patching modules cannot weaken it. Paths are
    compared with their symbolic links resolved, as the kernel will open them (a venv reached through a link)."""
    tmp = os.path.realpath(tmp)  # the roots are resolved already

    def inside(path: object, dirs: tuple[str, ...], _cwd: Callable[[], str] = os.getcwd,
               _lstat: Callable[..., Any] = os.lstat, _readlink: Callable[..., str] = os.readlink, _type: type = type,
               _str: type = str, _bytes: type = bytes, _bad: tuple[type, ...] = (OSError, ValueError)) -> bool:
        if _type(path) is _bytes:
            path = path.decode("utf-8", "surrogateescape")  # type: ignore[union-attr]
        if _type(path) is not _str:
            return False  # a path-like object could answer differently when asked again
        todo = (path if path.startswith("/") else _cwd() + "/" + path).split("/")[::-1]  # type: ignore[union-attr]
        full, links = "", 0
        while todo:
            part = todo.pop()
            if part == "..":
                full = full.rpartition("/")[0]
            elif part not in ("", "."):
                try:  # a link (at most 40, as the kernel): go on from its target
                    link = links < 40 and _lstat(full + "/" + part).st_mode & 0o170000 == 0o120000
                    target = _readlink(full + "/" + part) if link else None
                except _bad:  # no such file, or a NUL in the path
                    target = None
                if target is None:
                    full += "/" + part
                else:
                    links += 1
                    full = "" if target.startswith("/") else full
                    todo += target.split("/")[::-1]
        full = full or "/"
        for d in dirs:
            if full == d or full.startswith(d + "/"):
                return True
        return False

    def hook(event: str, args: tuple[Any, ...], _own: tuple[str, ...] = (tmp,), _read: tuple[str, ...] = (tmp, *roots),
             _inside: Callable[..., bool] = inside, _stat: Callable[..., Any] = os.stat, _type: type = type,
             _int: type = int, _fn: type = FunctionType, _writes: Any = MappingProxyType(dict(_WRITES)),
             _denied: tuple[str, ...] = _DENIED, _error: type = PermissionError, _no_import: Any = _NO_IMPORT,
             _oserror: type = OSError,
             _flags: int = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) -> None:
        if event.startswith(_denied):
            ok = False
        elif event == "open":
            if _type(args[0]) is _int:
                return
            ok = _inside(args[0], _own if args[2] & _flags else _read)  # read: also the Python installation
            try:  # and no directory: a directory fd would anchor dir_fd= paths the hook cannot see
                ok = ok and _stat(args[0]).st_mode & 0o170000 != 0o040000
            except _oserror:
                pass
        elif event in ("os.listdir", "os.scandir"):
            ok = _type(args[0]) is _int or args[0] is None or _inside(args[0], _read)
        elif event in _writes:
            ok = True
            for i in _writes[event][0]:
                ok = ok and _inside(args[i], _own)
            for i in _writes[event][1]:
                ok = ok and (args[i] is None or args[i] == -1)
        elif event == "import":
            ok = args[0].partition(".")[0] not in _no_import
        elif event == "object.__setattr__":  # namedtuple sets __defaults__, nothing legitimate sets __code__
            ok = not (_type(args[0]) is _fn and (args[1] == "__code__" or args[0] is _inside))
        else:
            return
        if not ok:
            raise _error(f"sandbox refused {event}")

    return hook


def _world_readable(path: str) -> bool:
    while path != "/":
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        path = os.path.dirname(path)
    return True


def _read(fd: int, deadline: float) -> bytes:
    """Up to 64 KiB from `fd`; b"" at end of file or at the deadline."""
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    return os.read(fd, 1 << 16) if ready else b""


def _send(fd: int, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


class _CappedWriter(io.TextIOBase):
    """sys.stdout for the program: keeps the first STDOUT_CAP characters, and the last 256 for the answer."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size, self.tail = 0, ""

    def write(self, text: str) -> int:  # type: ignore[override]
        text = str(text)
        if self.size < STDOUT_CAP:
            self.parts.append(text[: STDOUT_CAP - self.size])
            self.size += len(self.parts[-1])
        self.tail = (self.tail + text[-256:])[-256:]
        return len(text)

    def text(self) -> str:
        return "".join(self.parts)
