"""The sandbox for generated code, against hostile completions, for real (no mocks of the OS).

Each hostile program is written so that it *passes* if containment fails (it reaches `check`
and the nonce), and the host is inspected afterwards. Bounded on purpose: the fork loop stops at
1000 children and the allocation at 10 GB (this machine has more), so a failure of the
sandbox shows up as a failed test, not as a dead machine. After each hostile case a normal
program must still pass: the run goes on.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvbench import sandbox
from kvbench.errors import KvbenchError

ROOT = Path(__file__).resolve().parents[1]

SOLUTION = '''
def add(a, b):
    """Return a + b."""
    return a + b
'''
TESTS = '''

def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0


check(add)
'''
CORRECT = SOLUTION + TESTS
WRONG = "def add(a, b):\n    return a - b\n" + TESTS

FALLBACKS = [m for m in ("unshare", "rlimits-only") if m not in sandbox.TOOLS or shutil.which(sandbox.TOOLS[m])]


def processes() -> int:
    return sum(1 for e in os.listdir("/proc") if e.isdigit())


def hostile(program: str, timeout: float = 5.0, memory_mb: int = 1024, mode: str | None = None):
    """Run a hostile program; afterwards the sandbox must still pass a normal one."""
    start = time.monotonic()
    res = sandbox.run(program, timeout, memory_mb, mode=mode)
    elapsed = time.monotonic() - start
    assert elapsed < timeout + 2, f"took {elapsed:.1f}s for a {timeout}s timeout"
    assert not res.passed, res
    assert sandbox.run(CORRECT, 10, mode=mode).passed, "a normal program no longer passes after a hostile one"
    return res


# ---- the normal cases -------------------------------------------------------------------------

def test_isolation_is_the_strongest_available():
    mode = sandbox.isolation()
    assert mode in sandbox.MODES
    if shutil.which("bwrap"):
        assert mode == "bwrap", "bubblewrap is installed but the sandbox fell back"


def test_correct_program_passes():
    res = sandbox.run(CORRECT)
    assert (res.passed, res.status, res.isolation) == (True, "passed", sandbox.isolation()), res
    assert sandbox.run_tests(CORRECT) is True


def test_wrong_program_fails():
    res = sandbox.run(WRONG)
    assert (res.passed, res.status) == (False, "failed")
    assert "AssertionError" in res.stderr_tail
    assert sandbox.run_tests(WRONG) is False


def test_syntax_error_fails():
    res = sandbox.run("def add(a, b) return a + b\n" + TESTS)
    assert res.status == "failed" and "SyntaxError" in res.stderr_tail


def test_output_is_kept_and_stdlib_imports_work():
    res = sandbox.run("import math, re, collections, itertools, heapq, hashlib, typing\nprint('hello', math.pi)\n"
                      + CORRECT)
    assert res.passed and "hello 3.14159" in res.stdout_tail


def test_concurrent_runs_do_not_interfere():
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(sandbox.run_tests, [CORRECT, WRONG] * 4))
    assert results == [True, False] * 4


def test_bad_arguments_are_user_errors():
    for kwargs in ({"timeout": 0}, {"timeout": float("inf")}, {"memory_mb": 8}, {"memory_mb": 1.5}):
        with pytest.raises(KvbenchError):
            sandbox.run(CORRECT, **kwargs)
    with pytest.raises(KvbenchError):
        sandbox.run(CORRECT, mode="chroot")


def test_a_sandbox_that_cannot_start_is_an_error_not_a_fail(monkeypatch):
    monkeypatch.setattr(sandbox, "_wrapper", lambda mode, root: ["/bin/false"])
    assert sandbox.run(CORRECT).status == "error"
    with pytest.raises(KvbenchError, match="fix:"):
        sandbox.run_tests(CORRECT)


def test_missing_bwrap_falls_back_with_one_warning(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    monkeypatch.setattr(sandbox, "_chosen", None)
    monkeypatch.setattr(sandbox, "_warned", False)
    with pytest.warns(RuntimeWarning, match="apt-get install -y bubblewrap"):
        mode = sandbox.isolation()
    assert mode == FALLBACKS[0]
    assert sandbox.run(CORRECT).isolation == mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(sandbox, "_chosen", None)
        assert sandbox.isolation() == mode  # probed again, not warned again


# ---- hostile completions ----------------------------------------------------------------------

def test_infinite_loop_times_out():
    res = hostile("while True:\n    pass\n" + CORRECT, timeout=2)
    assert res.status == "timeout"


def test_sleeping_forever_times_out():
    res = hostile("import time\ntime.sleep(1000)\n" + CORRECT, timeout=2)
    assert res.status == "timeout"


def test_fork_loop_is_contained():
    # Forks without end (retrying when refused), bounded at 1000 children that sleep: it passes
    # only if 1000 forks succeed. The process limit must refuse forks long before.
    program = '''
import os, time
forked = refused = 0
while forked < 1000:
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        if refused == 1:
            print("fork refused after", forked, flush=True)
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    forked += 1
''' + CORRECT
    before = processes()
    res = hostile(program, timeout=3)
    assert res.status == "timeout", res
    refused_after = int(res.stdout_tail.split("fork refused after")[1].split()[0])
    assert refused_after <= sandbox.NPROC_LIMIT
    assert processes() <= before + 5, "sleeping children survived the run"


def test_leftover_background_processes_are_killed():
    program = '''
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
''' + CORRECT
    before = processes()
    assert sandbox.run(program).passed
    time.sleep(0.2)
    assert processes() <= before + 2, "a detached grandchild outlived its run"


def test_allocating_10_gb_is_contained():
    program = '''
chunks = []
for _ in range(40):
    chunks.append(bytearray(256 << 20))  # 10 GB in 256 MB chunks, each page written
''' + CORRECT
    res = hostile(program, timeout=20, memory_mb=1024)
    assert res.status == "failed" and "MemoryError" in res.stderr_tail, res
    res = hostile("x = bytearray(10 << 30)\n" + CORRECT, timeout=20)
    assert res.status == "failed" and "MemoryError" in res.stderr_tail, res


def test_huge_file_is_cut_at_the_file_size_limit():
    program = '''
with open("big", "wb") as f:
    for _ in range(64):
        f.write(b"x" * (1 << 20))
''' + CORRECT
    res = hostile(program)
    assert res.status == "failed"


def test_writing_outside_its_directory_does_not_reach_the_host():
    tag = secrets.token_hex(6)
    targets = [f"/tmp/kvbench-escape-{tag}", str(ROOT / f"kvbench-escape-{tag}"),
               os.path.expanduser(f"~/kvbench-escape-{tag}"), f"/var/tmp/kvbench-escape-{tag}",
               f"/dev/shm/kvbench-escape-{tag}", f"../kvbench-escape-{tag}"]
    try:
        tolerant = f"for p in {targets!r}:\n    try:\n        open(p, 'w').write('x')\n" \
                   "    except OSError as e:\n        print(p, e)\n" + CORRECT
        sandbox.run(tolerant)  # may "pass": the writes that succeed land in its private tmpfs
        # Writing into the project (read-only, or not even visible when it lies under /tmp) fails the program.
        res = hostile(f"open({targets[1]!r}, 'w').write('x')\n" + CORRECT)
        assert res.status == "failed"
        assert any(s in res.stderr_tail for s in ("Read-only file system", "Permission denied",
                                                  "No such file or directory")), res
        leaked = [p for p in targets if os.path.exists(p)]
        leaked += glob.glob(f"{tempfile.gettempdir()}/kvbench-sandbox-*/kvbench-escape-{tag}")
        assert not leaked, f"files written outside the sandbox: {leaked}"
    finally:
        for p in targets[:5]:
            if os.path.exists(p):
                os.remove(p)


def test_opening_a_socket_to_the_host_fails():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        program = f'''
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
s.sendall(b"escaped")
''' + CORRECT
        res = hostile(program)
        assert res.status == "failed"
        assert any(s in res.stderr_tail for s in ("ConnectionRefused", "PermissionError", "unreachable")), res
        # The listener itself works from the host.
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        time.sleep(0.3)
        assert len(accepted) == 1, "the sandboxed program reached the host's listener"
    finally:
        stop.set()
        thread.join()
        server.close()
        for conn in accepted:
            conn.close()


ENV_PROBE = '''
import os
found = [k for k in os.environ if k == "KVBENCH_SANDBOX_SECRET"]
for pid in os.listdir("/proc"):
    try:
        data = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        continue
    found += [item.decode() for item in data.split(b"\\0") if item.startswith(b"KVBENCH_SANDBOX_SECRET=")]
print("found", found)
assert found
''' + CORRECT


def test_the_harness_environment_is_not_visible():
    # A harness started with the secret in its environment (so it is also in /proc/<pid>/environ).
    secret = secrets.token_hex(16)
    script = f"from kvbench import sandbox\nres = sandbox.run({ENV_PROBE!r})\nprint(res)\n" \
             f"assert sandbox.run({CORRECT!r}).passed\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, KVBENCH_SANDBOX_SECRET=secret))
    assert out.returncode == 0, out.stderr
    assert "passed=False" in out.stdout and "found []" in out.stdout, out.stdout
    assert secret not in out.stdout


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit(0)",
                                       "raise SystemExit(0)", "raise KeyboardInterrupt"])
def test_exiting_before_the_checks_fails(exit_call):
    program = SOLUTION + exit_call + "\n" + TESTS
    res = hostile(program)
    assert res.status == "failed"


def test_exiting_inside_the_candidate_fails():
    program = "import os\n\ndef add(a, b):\n    os._exit(0)\n" + TESTS
    assert hostile(program).status == "failed"


def test_printing_a_fake_pass_fails():
    program = SOLUTION + '''
import os, sys
print("PASS")
print("passed")
print("started")
print("nonce:" + "0" * 32)
for fd in range(1, 40):  # guess the harness's channels
    try:
        os.write(fd, b"started\\nnonce:" + os.urandom(16).hex().encode() + b"\\n")
    except OSError:
        pass
sys.stdout.flush()
os._exit(0)
''' + TESTS
    assert hostile(program).status == "failed"


def test_the_working_directory_is_removed():
    pattern = f"{tempfile.gettempdir()}/kvbench-sandbox-*"
    before = set(glob.glob(pattern))
    program = '''
import os
os.makedirs("a/b", exist_ok=True)
open("a/b/f", "w").write("x" * 1000)
os.chmod("a/b", 0)
os.chmod("a", 0)
print(os.getcwd())
''' + CORRECT
    res = sandbox.run(program)
    assert res.passed
    assert set(glob.glob(pattern)) == before
    workdir = res.stdout_tail.split()[0]
    assert not os.path.exists(workdir), f"{workdir} is left on the host"


# ---- the weaker fallbacks, forced (what each still guarantees) --------------------------------

@pytest.mark.parametrize("mode", FALLBACKS)
def test_fallbacks_contain_what_they_promise(mode, monkeypatch):
    assert sandbox.run(CORRECT, mode=mode).passed
    assert sandbox.run(WRONG, mode=mode).status == "failed"
    assert hostile("while True:\n    pass\n" + CORRECT, timeout=2, mode=mode).status == "timeout"
    assert hostile(SOLUTION + "import os\nos._exit(0)\n" + TESTS, mode=mode).status == "failed"
    res = hostile("x = bytearray(10 << 30)\n" + CORRECT, mode=mode)
    assert "MemoryError" in res.stderr_tail
    res = hostile("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n" + CORRECT, mode=mode)
    assert any(s in res.stderr_tail for s in ("ConnectionRefused", "PermissionError", "unreachable")), res
    monkeypatch.setenv("KVBENCH_SANDBOX_SECRET", "x")  # set after start-up: only os.environ can show it
    res = hostile(ENV_PROBE, mode=mode)
    assert "found []" in res.stdout_tail, res
    if mode == "unshare":  # private tmpfs over the world-writable directories
        tag = secrets.token_hex(6)
        targets = [f"{d}/kvbench-escape-{tag}" for d in ("/tmp", "/var/tmp", "/dev/shm")]
        sandbox.run(f"for p in {targets!r}:\n    open(p, 'w').write('x')\n", mode=mode)
        leaked = [p for p in targets if os.path.exists(p)]
        for p in leaked:
            os.remove(p)
        assert not leaked
