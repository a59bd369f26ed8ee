"""The PoT sandbox: a hostile corpus, normal programs, answer conversion, order, and pool recovery.

The hostile corpus runs once (in parallel, 1 s timeout) in a module fixture; every case then checks its own
result and that nothing outside the sandbox changed: a canary dir, $HOME, the working directory, /tmp, a
listening socket, and the process tree.
"""

from __future__ import annotations

import cmath
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import FrozenInstanceError
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sympy

from mdlite import sandbox
from mdlite.sandbox import STDOUT_CAP, ProgramResult, extract_number, run_program, run_programs

SECRET = "mdlite-test-secret-4f1c"
os.environ["MDLITE_TEST_SECRET"] = SECRET  # the sandbox must not pass it on
OS = "print.__self__.__import__('os')"  # the real import, reached through a builtin's module
IMP = "print.__self__.__import__"
# Placeholders filled in at run time: CANARY (a dir with canary.txt), HOME_FILE, CWD, PORT, TAG.
HOSTILE = [
    # (id, code, expected: a float value, or a substring of the error)
    ("infinite_loop", "while True:\n    pass", "timeout"),
    ("sleep", "import time\ntime.sleep(30)", "timeout"),
    ("ignores_sigterm_and_sigxcpu",
     f"s = {IMP}('signal')\ns.signal(s.SIGTERM, s.SIG_IGN)\ns.signal(s.SIGXCPU, s.SIG_IGN)\nwhile True:\n    pass",
     "timeout"),
    ("print_flood", "while True:\n    print(12345)", "timeout"),
    # Hazardous cases are made harmless in case the sandbox ever regresses: forked children exit at once,
    # kill() sends signal 0.
    ("fork_bomb", f"os = {OS}\nfor _ in range(10000):\n    if os.fork() == 0:\n        os._exit(0)", "PermissionError"),
    ("fork_exec_under_the_hook",  # no audit event: the kernel's RLIMIT_NPROC for user nobody stops it
     f"ps = {IMP}('_posixsubprocess')\nr = {OS}.pipe()\nps.fork_exec([b'/usr/bin/touch'], [b'/usr/bin/touch', "
     "b'CANARY/forked'], True, (), None, None, -1, -1, -1, -1, -1, -1, *r, False, False, False, None, None, None, "
     "-1, None, False)\nimport time\ntime.sleep(0.3)",
     "Resource temporarily unavailable" if sys.version_info[:2] == (3, 11) and os.geteuid() == 0 else "Error"),
    ("thread_bomb", f"th = {IMP}('threading')\nimport time\nfor _ in range(1000):\n"
                    "    th.Thread(target=time.sleep, args=(5,)).start()", "can't start new thread"),
    ("memory_bomb", "x = bytearray(10 ** 10)", "memory"),
    ("memory_growth", "a = []\nwhile True:\n    a.append(' ' * 10 ** 7)", "memory"),
    ("numpy_memory_bomb", "import numpy as np\nnp.ones(10 ** 10)", "memory"),
    ("deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)", "RecursionError"),
    ("deep_recursion_unlimited", f"{IMP}('sys').setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)",
     ""),  # memory, timeout or a crash: any error
    ("huge_print", "print('x' * 10 ** 7)", "no answer"),
    ("write_canary_dir", "open('CANARY/pwned.txt', 'w').write('x')", "PermissionError"),
    ("append_canary_file", "open('CANARY/canary.txt', 'a').write('x')", "PermissionError"),
    ("write_relative_escape", "open('../../../../../../../../CANARY/pwned.txt', 'w').write('x')", "PermissionError"),
    ("write_parent_cwd", "open('CWD/mdlite-pwned-TAG', 'w').write('x')", "PermissionError"),
    ("write_home", "open('HOME_FILE', 'w').write('x')", "PermissionError"),
    ("write_tmp", "open('/tmp/mdlite-pwned-TAG', 'w').write('x')", "PermissionError"),
    ("delete_canary", f"{OS}.remove('CANARY/canary.txt')", "PermissionError"),
    ("rename_canary", f"{OS}.rename('CANARY/canary.txt', 'stolen.txt')", "PermissionError"),
    ("rmtree_canary", f"{IMP}('shutil').rmtree('CANARY')", "PermissionError"),
    ("chmod_canary", f"{OS}.chmod('CANARY/canary.txt', 0o777)", "PermissionError"),
    ("symlink_escape", f"{OS}.symlink('/etc/passwd', 'p')\nprint(open('p').read())", "PermissionError"),
    ("chdir_escape", f"{OS}.chdir('/')\nopen('mdlite-pwned-TAG', 'w')", "PermissionError"),
    ("dir_fd_escape", f"os = {OS}\nos.mkdir('a')\nfd = os.open('.', os.O_RDONLY)\n"
                      "os.open('../mdlite-pwned-TAG', os.O_CREAT | os.O_WRONLY, dir_fd=fd)", "PermissionError"),
    ("shared_memory", f"os = {OS}\n{IMP}('_posixshmem').shm_open('/mdlite-pwned-TAG', os.O_CREAT | os.O_RDWR)",
     "PermissionError"),
    ("read_etc_passwd", "print(open('/etc/passwd').read())", "PermissionError"),
    ("read_bytes_path", "print(open(b'/etc/passwd').read())", "PermissionError"),
    ("read_proc_environ", "print(open('/proc/1/environ').read())", "PermissionError"),
    ("read_canary", "print(open('CANARY/canary.txt').read())", "PermissionError"),
    ("read_via_pathlike", "class P:\n    n = 0\n    def __fspath__(self):\n        P.n += 1\n"
                          "        return '/tmp/x' if P.n == 1 else '/etc/passwd'\nprint(open(P()).read())",
     "PermissionError"),
    ("list_root", f"print({OS}.listdir('/'))", "PermissionError"),
    ("environment", f"print(dict({OS}.environ))\nans = int('MDLITE_TEST_SECRET' in {OS}.environ)", 0.0),
    ("socket_connect", f"s = {IMP}('socket').create_connection(('127.0.0.1', PORT), timeout=0.5)", "PermissionError"),
    ("raw_socket_module", f"s = {IMP}('_socket').socket()\ns.connect(('127.0.0.1', PORT))", "PermissionError"),
    ("subprocess", f"{IMP}('subprocess').run(['touch', 'CANARY/pwned.txt'])", "PermissionError"),
    ("os_system", f"{OS}.system('touch CANARY/pwned.txt')", "PermissionError"),
    ("os_popen", f"{OS}.popen('touch CANARY/pwned.txt').read()", "PermissionError"),
    ("posix_spawn", f"{OS}.posix_spawn('/usr/bin/touch', ['touch', 'CANARY/pwned.txt'], {{}})", "PermissionError"),
    ("exec_replaces_process", f"{OS}.execv('/usr/bin/touch', ['touch', 'CANARY/pwned.txt'])", "PermissionError"),
    ("ctypes", f"{IMP}('ctypes').CDLL(None).system(b'touch CANARY/pwned.txt')", "PermissionError"),
    ("kill_worker", f"{OS}.kill({OS}.getppid(), 0)", "PermissionError"),
    ("kill_everyone", f"{OS}.kill(-1, 0)", "PermissionError"),
    ("import_os", "import os\nos.remove('CANARY/canary.txt')", "ImportError"),
    ("import_importlib", "import importlib", "ImportError"),
    ("relative_import", "from . import sandbox", "ImportError"),
    ("builtins_import", "__builtins__['__import__']('os').remove('CANARY/canary.txt')", "ImportError"),
    ("getattr_trick", "getattr(getattr(print, '__self__'), '__import__')('os').remove('CANARY/canary.txt')",
     "PermissionError"),
    ("importlib_trick", f"{IMP}('importlib').import_module('shutil').rmtree('CANARY')", "PermissionError"),
    ("subclasses_trick", "c = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]\n"
                         "c.__init__.__globals__['system']('touch CANARY/pwned.txt')", "PermissionError"),
    ("gc_walk", f"print(len({IMP}('gc').get_objects()))", "PermissionError"),
    ("patch_hook_helpers", f"{OS}.getcwd = lambda: '/'\n{IMP}('posixpath').join = None\n"
                           "open('CANARY/pwned.txt', 'w')", "PermissionError"),
    ("replace_function_code", "def f():\n    pass\nf.__code__ = (lambda: 1).__code__", "PermissionError"),
    ("raise_limits", f"r = {IMP}('resource')\nr.setrlimit(r.RLIMIT_CPU, (-1, -1))", "PermissionError"),
    ("close_stdout", f"{IMP}('sys').stdout.close()\n{OS}.close(1)\n{OS}.close(2)\nprint(7)", 7.0),
    ("huge_exception", "raise ValueError('x' * 10 ** 7)", "ValueError: xxx"),
    ("exception_str_raises", "class E(Exception):\n    def __str__(self):\n        raise RuntimeError\nraise E()", "E"),
    ("sys_exit_error", f"{IMP}('sys').exit(3)", "SystemExit: 3"),
    ("sys_exit_clean", f"ans = 4\n{IMP}('sys').exit()", 4.0),
    ("os_exit", f"{OS}._exit(7)", "exit status 7"),
    ("os_exit_clean", f"{OS}._exit(0)", "no answer"),
    ("segfault", f"{IMP}('faulthandler')._sigsegv()", "killed by SIGSEGV"),
    ("big_file", "open('big', 'wb').write(b'0' * (64 << 20))", "File too large"),
    ("syntax_error", "def solution(:\n    return 1", "SyntaxError"),
    ("answer_string", "ans = 'five'", "no answer"),
    ("answer_list", "ans = [5, 6]", "no answer"),
    ("answer_none", "def solution():\n    return None", "no answer"),
    ("answer_nan", "ans = float('nan')", "no answer"),
    ("answer_inf", "ans = float('inf')", "no answer"),
    ("answer_bool", "def solution():\n    return True", "no answer"),
    ("answer_complex", "ans = 1 + 2j", "no answer"),
    ("answer_printed_text", "print('the answer is five')", "no answer"),
    ("solution_raises", "def solution():\n    return x", "NameError: name 'x' is not defined"),
    ("forged_reply", f"os = {OS}\nfor fd in range(3, 64):\n    try:\n"
                     "        os.write(fd, b'{\"ok\": true, \"value\": NaN, \"error\": null, \"stdout\": 1}')\n"
                     "    except OSError:\n        pass\nos._exit(0)", "no answer"),
    ("forged_answer", f"os = {OS}\nfor fd in range(3, 64):\n    try:\n"
                      "        os.write(fd, b'{\"ok\": false, \"value\": 41, \"error\": null, \"stdout\": \"\"}')\n"
                      "    except OSError:\n        pass\nos._exit(0)", 41.0),  # its own answer, in the right type
    ("whoami", f"ans = {OS}.getuid()", 65534.0 if os.geteuid() == 0 else float(os.geteuid())),
    ("own_temp_dir_is_fine", "open('n.txt', 'w').write('12')\nans = int(open('n.txt').read())", 12.0),
]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


def _children(pid: int) -> dict[int, str]:
    """{child pid: state} from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out[int(stat.parent.name)] = fields[0]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    canary = tmp_path_factory.mktemp("canary")
    (canary / "canary.txt").write_text("canary")
    home_file = Path.home() / f".mdlite-sandbox-canary-{os.getpid()}"
    home_file.write_text("home canary")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    connections: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connections.append(listener.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    tag = str(os.getpid())
    port = str(listener.getsockname()[1])
    subs = {"CANARY": str(canary), "HOME_FILE": str(home_file), "CWD": os.getcwd(), "PORT": port, "TAG": tag}
    codes = []
    for _, code, _ in HOSTILE:
        for key, value in subs.items():
            code = code.replace(key, value)
        codes.append(code)
    before = _tree(canary)
    try:
        results = run_programs(codes, timeout=2.0)  # room for the memory cases on a loaded machine
        time.sleep(0.3)  # let a stray connection attempt arrive, if any was made
    finally:
        stop.set()
        thread.join()
        listener.close()
        after = _tree(canary)
        home_after = home_file.read_text()
        home_file.unlink()
    leftovers = [p for p in (Path(os.getcwd()) / f"mdlite-pwned-{tag}", Path(f"/tmp/mdlite-pwned-{tag}"),
                             Path("/mdlite-pwned-" + tag), Path("/dev/shm/mdlite-pwned-" + tag)) if p.exists()]
    return {"results": dict(zip([case[0] for case in HOSTILE], results, strict=True)), "before": before, "after": after,
            "home": home_after, "leftovers": leftovers, "connections": connections}


@pytest.mark.parametrize("case_id, code, expected", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_program(corpus: dict[str, Any], case_id: str, code: str, expected: float | str) -> None:
    result = corpus["results"][case_id]
    assert isinstance(result, ProgramResult)
    if isinstance(expected, float):
        assert result.ok and result.value == expected and result.error is None, result
    else:
        assert not result.ok and result.value is None and result.error and expected in result.error, result
        assert len(result.error) <= 200
    assert len(result.stdout) <= STDOUT_CAP
    assert SECRET not in result.stdout
    # nothing outside the program's temp dir changed
    assert corpus["after"] == corpus["before"]
    assert corpus["home"] == "home canary"
    assert corpus["leftovers"] == []
    assert corpus["connections"] == []


def test_corpus_is_big_and_every_program_got_a_result(corpus: dict[str, Any]) -> None:
    assert len(HOSTILE) >= 30
    assert all(isinstance(result, ProgramResult) for result in corpus["results"].values())


def test_parent_stays_healthy_after_corpus(corpus: dict[str, Any]) -> None:
    assert run_program("ans = 1 + 1") == ProgramResult(True, 2.0, None, "")
    pool = sandbox._get_pool(None)
    workers = {w.proc.pid for w in pool.workers}
    children = _children(os.getpid())
    assert all(w.proc.poll() is None for w in pool.workers)
    assert not [pid for pid, state in children.items() if state == "Z"]  # no zombies
    sandbox_children = {pid for pid in children if "_mdlite_sandbox" in _cmdline(pid)}
    assert sandbox_children == workers
    assert not [pid for w in workers for pid in _children(w)]  # no program outlived its run


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


@pytest.mark.skipif(os.geteuid() != 0, reason="the network namespace is asserted where we can create it")
def test_workers_have_their_own_network_namespace() -> None:
    run_program("ans = 1")
    for worker in sandbox._get_pool(None).workers:
        assert os.readlink(f"/proc/{worker.proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")


def test_isolation_says_what_the_workers_report() -> None:
    words, offline = sandbox.isolation()
    assert ("in an empty network namespace" in words) == offline and "audit hook" in words
    assert ("as user nobody" in words) == (os.geteuid() == 0)


NORMAL = [
    ("def solution():\n    return 3/4", 0.75),
    ("from fractions import Fraction\ndef solution():\n    return Fraction(1, 3) + Fraction(1, 6)", 0.5),
    ("from decimal import Decimal\nans = Decimal('1.25') * 2", 2.5),
    ("import numpy as np\nans = np.int64(7) * np.float32(0.5)", 3.5),
    ("import numpy as np\nans = np.array([1, 2, 3]).sum()", 6.0),
    ("import numpy as np\nans = np.linalg.solve(np.array([[2.0, 1], [1, 3]]), np.array([3.0, 5]))[0]", 0.8),
    ("import sympy as sp\nx = sp.symbols('x')\nans = sp.solve(sp.Eq(2 * x + 3, 11), x)[0]", 4.0),
    ("import sympy\nans = sympy.Rational(3, 8)", 0.375),
    ("from sympy import sqrt, integrate, Symbol\nx = Symbol('x')\nans = sqrt(8) / sqrt(2) + integrate(x, (x, 0, 2))",
     4.0),
    # values extract_number reads by choice (see its docstring)
    ("import numpy as np\ndef solution():\n    return np.longdouble(7) / 2", 3.5),
    ("import cmath\nans = cmath.sqrt(16)", 4.0),
    ("from sympy import solve, symbols\nx = symbols('x')\nans = solve(2 * x - 6, x)", 3.0),  # a one-element list
    ("ans = '12'", 12.0),
    ("ans = 5", 5.0),
    ("answer = 2.5", 2.5),
    ("print('the answer is')\nprint(42)", 42.0),
    ("print('1,234')", 1234.0),
    ("print(3/4 * 4)\nprint('3/4')", 0.75),
    ("import math, itertools\nans = math.comb(10, 3) + len(list(itertools.permutations(range(4))))", 144.0),
    ("import statistics\nfrom collections import Counter\nans = statistics.mean([1, 2, 3, 4]) + Counter('aab')['a']",
     4.5),
    ("def solution():\n    print('working')\n    return 7\n\nif __name__ == '__main__':\n    print(solution())", 7.0),
    ("def solution():\n    return 2 ** 10\nans = 3", 1024.0),  # solution() wins over ans
]


def test_normal_programs() -> None:
    results = run_programs([code for code, _ in NORMAL], timeout=30)
    for (code, expected), result in zip(NORMAL, results, strict=True):
        assert result.ok and result.error is None, (code, result)
        assert result.value == pytest.approx(expected), (code, result)
    assert results[-2].stdout == "working\n7\nworking\n"  # the sandbox calls solution() once more itself


@pytest.mark.parametrize(
    "value, expected",
    [(3, 3.0), (0.5, 0.5), (Fraction(1, 4), 0.25), (Decimal("2.5"), 2.5), (np.int32(4), 4.0), (np.float16(0.5), 0.5),
     (np.array(1.5), 1.5), (sympy.Integer(7), 7.0), (sympy.Rational(1, 8), 0.125),
     (sympy.pi, pytest.approx(3.14159, 1e-5)), (sympy.sqrt(2) ** 2, 2.0), (True, None), (np.bool_(True), None),
     (float("nan"), None), (float("-inf"), None), (Decimal("NaN"), None), (Decimal("sNaN"), None), (10**400, None),
     (None, None), (1j, None), (np.array([1, 2]), None), (np.array(["5"]), None), ([5, 6], None), ([[5]], None),
     ([], None), ("five", None), ("", None), (np.complex128(1 + 1j), None), (np.array([True]), None),
     # by choice: numpy's long double; a one-element list, tuple or array is its element; a numeric string its
     # number; a complex number without imaginary part its real part
     (np.longdouble(2.5), 2.5), (np.clongdouble(3), 3.0), ([5], 5.0), ((2.5,), 2.5), (np.array([1.0]), 1.0),
     (np.array([[2]]), 2.0), (["7"], 7.0), ("5", 5.0), (np.str_("5"), 5.0), (" 3/4 ", 0.75), ("1,000", 1000.0),
     (cmath.sqrt(16), 4.0), (4 + 0j, 4.0), (cmath.sqrt(-16), None),
     (sympy.I, None), (sympy.oo, None), (sympy.Symbol("x"), None), (sympy.true, None)],
)
def test_extract_number(value: object, expected: float | None) -> None:
    assert extract_number(value) == expected


def test_a_venv_reached_through_a_link_reads_its_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The workers run sys.executable: through a link to sys.prefix, Python finds its packages through the link
    # too, and the sandbox must resolve links before comparing paths with the (resolved) read roots.
    if not sys.executable.startswith(sys.prefix + "/"):
        pytest.skip("the interpreter is not inside sys.prefix")
    link = tmp_path / "env"
    link.symlink_to(sys.prefix, target_is_directory=True)
    monkeypatch.setattr(sys, "executable", str(link) + sys.executable[len(sys.prefix):])
    monkeypatch.setattr(sandbox, "_POOL", None)
    try:
        [result] = run_programs(["from sympy import solve, symbols\nx = symbols('x')\nans = solve(2 * x - 6, x)[0]"],
                                timeout=30, workers=1)
    finally:
        sandbox._POOL.close()  # type: ignore[union-attr]
    assert result == ProgramResult(True, 3.0, None, ""), result


def test_result_is_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        run_program("ans = 1").value = 2  # type: ignore[misc]


def test_run_programs_keeps_order_with_mixed_programs() -> None:
    codes = [f"ans = {i}" if i % 3 else "while True: pass" if i % 2 else f"raise ValueError('{i}')" for i in range(12)]
    results = run_programs(codes, timeout=0.5, workers=2)
    for i, result in enumerate(results):
        if i % 3:
            assert result == ProgramResult(True, float(i), None, "")
        else:
            assert result.error == ("timeout" if i % 2 else f"ValueError: {i}")


def test_pool_recovers_after_a_worker_is_killed() -> None:
    run_programs(["ans = 1"] * 4, workers=2)
    pool = sandbox._get_pool(2)
    victim = pool.workers[0].proc
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=5)
    results = run_programs([f"ans = {i}" for i in range(6)], workers=2)
    assert [r.value for r in results] == [float(i) for i in range(6)]
    assert victim.pid not in {w.proc.pid for w in pool.workers}
    assert all(w.proc.poll() is None for w in pool.workers)
    assert victim.pid not in _children(os.getpid())  # reaped, no zombie
