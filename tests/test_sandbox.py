"""The sandbox for generated code, against hostile completions, for real (no mocks of the OS).

Each hostile program is written so that it *passes* if containment fails (it reaches `check`
and the nonce), and the host is inspected afterwards. Bounded on purpose: the fork loop stops at
1000 children and the allocation at 10 GB (this machine has more), so a failure of the
sandbox shows up as a failed test, not as a dead machine. After each hostile case a normal
program must still pass: the run goes on.

Only what a test's own runs made is inspected, never the host as a whole (other processes come
and go): programs name their processes with a tag (prctl PR_SET_NAME, inherited by forks) that
the test looks for in /proc, and temp directories are globbed in a directory of the test's own.
No test waits a fixed time for something to happen; the few time bounds left are wide (a loaded
2-core machine runs ten times slower) and say why.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
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

from kvbench.errors import KvbenchError
from kvbench.tasks import sandbox

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


# Wide on purpose: it catches a timeout that is not enforced (those programs would run for
# minutes, or forever), not a slow start: under load, starting bwrap and Python can take seconds.
SLACK = 60.0


def tag(name: str) -> str:
    """A process name (at most 15 bytes) unique to this test process and `name`."""
    out = f"kv{os.getpid()}{name}"
    assert len(out) <= 15
    return out


def name_as(t: str) -> str:
    """Program text that names its process `t` (children forked later inherit the name)."""
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {t.encode()!r}, 0, 0, 0)  # PR_SET_NAME\n"


def live(t: str) -> list[int]:
    """Pids of the running (not zombie) processes named `t`."""
    pids = []
    for e in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{e}/stat").read_text() if e.isdigit() else ""
        except OSError:
            continue
        # "pid (comm) state ...": comm may hold spaces or parentheses, so split at the last ")".
        if stat and stat[stat.index("(") + 1:stat.rindex(")")] == t and stat[stat.rindex(")") + 2] != "Z":
            pids.append(int(e))
    return pids


def gone(t: str, within: float = SLACK) -> bool:
    """Whether every process named `t` has ended (dying ones get `within` seconds, polled)."""
    deadline = time.monotonic() + within
    while live(t):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def private_tmp(monkeypatch):
    """A temp directory of this test's own for the sandbox's working directories (tempfile.tempdir)."""
    d = tempfile.mkdtemp(prefix="kvbench-test-")
    os.chmod(d, 0o711)  # like /tmp: the run's uid passes through to its directory (rlimits-only)
    monkeypatch.setattr(tempfile, "tempdir", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def hostile(program: str, timeout: float = 30.0, memory_mb: int = 1024, mode: str | None = None):
    """Run a hostile program; afterwards the sandbox must still pass a normal one. The default
    timeout is wide: programs meant to fail end at once, and a slow start under load must not turn
    their "failed" into a "timeout"; programs meant to time out pass a short one."""
    start = time.monotonic()
    res = sandbox.run(program, timeout, memory_mb, mode=mode)
    elapsed = time.monotonic() - start
    assert elapsed < timeout + SLACK, f"took {elapsed:.1f}s for a {timeout}s timeout"
    assert not res.passed, res
    assert sandbox.run(CORRECT, SLACK, mode=mode).passed, "a normal program no longer passes after a hostile one"
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
        results = list(pool.map(lambda p: sandbox.run_tests(p, SLACK), [CORRECT, WRONG] * 4))  # 8 runs, 2 cores
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
    # only if 1000 forks succeed. The process limit must refuse forks long before. After 1000
    # refusals it gives up and fails: no timeout to wait out (one a loaded machine could reach
    # before the first refusal), and its children are left for the harness to kill.
    t = tag("fork")
    program = name_as(t) + '''
import os, time
forked = refused = 0
while forked < 1000:
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        if refused == 1:
            print("fork refused after", forked, flush=True)
        if refused == 1000:
            os._exit(1)
        continue
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    forked += 1
''' + CORRECT
    res = hostile(program)
    assert res.status == "failed", res
    refused_after = int(res.stdout_tail.split("fork refused after")[1].split()[0])
    assert refused_after <= sandbox.NPROC_LIMIT
    assert gone(t), "sleeping children survived the run"


DETACHED = '''
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(600)
    os._exit(0)
''' + CORRECT


def test_leftover_background_processes_are_killed():
    t = tag("bg")
    assert sandbox.run(name_as(t) + DETACHED).passed
    assert gone(t), "a detached grandchild outlived its run"


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


def test_writing_outside_its_directory_does_not_reach_the_host(private_tmp):
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
        leaked += glob.glob(f"{private_tmp}/kvbench-sandbox-*/kvbench-escape-{tag}")
        assert not leaked, f"files written outside the sandbox: {leaked}"
    finally:
        for p in targets[:5]:
            if os.path.exists(p):
                os.remove(p)


def test_opening_a_socket_to_the_host_fails():
    # No accept thread, no waiting: the kernel queues every connection that reaches the listener
    # (accepted or not, in arrival order). After the program's try and then the host's own
    # connection, the first connection accepted must be the host's and no other may be pending.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted = []
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
        with socket.create_connection(("127.0.0.1", port), timeout=SLACK) as client:
            server.settimeout(SLACK)  # the host's connection is queued already: accept returns at once
            accepted.append(server.accept())
            assert accepted[0][1] == client.getsockname(), "the sandboxed program reached the host's listener"
            server.setblocking(False)
            with pytest.raises(BlockingIOError):
                accepted.append(server.accept())  # nothing else is queued
    finally:
        server.close()
        for conn, _ in accepted:
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
    script = f"from kvbench.tasks import sandbox\nres = sandbox.run({ENV_PROBE!r})\nprint(res)\n" \
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


def test_the_working_directory_is_removed(private_tmp):
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
    assert os.listdir(private_tmp) == []
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


# ---- uids: a run's own, never shared with a concurrent run ------------------------------------

# Imports only kvbench.tasks.sandbox in a child Python: the package's __init__ pulls in torch (seconds under load).
CHILD_PRELUDE = f'''
import json, sys, types
pkg = types.ModuleType("kvbench")
pkg.__path__ = [{str(ROOT / "kvbench")!r}]
sys.modules["kvbench"] = pkg
from kvbench.tasks import sandbox
'''
FAR = 500_000_000  # four uids no one here uses: the lease tests below never run a program with them


@pytest.fixture
def four_uids(monkeypatch, tmp_path):
    """A uid map with four private uids, leased in a directory of this test's own."""
    monkeypatch.setattr(sandbox, "_uid_ranges", [(FAR, FAR + 4)])
    monkeypatch.setattr(sandbox, "UID_LEASES", str(tmp_path / "leases"))
    return set(range(FAR, FAR + 4))


def test_uid_leases_are_private_across_threads(four_uids):
    start, hold = threading.Barrier(4), threading.Barrier(4)

    def take(_):
        start.wait(timeout=SLACK)  # all four try at once
        lease = sandbox._lease_uid()
        hold.wait(timeout=SLACK)  # and all four hold theirs at once
        return lease

    with ThreadPoolExecutor(4) as pool:
        leases = list(pool.map(take, range(4)))
    try:
        assert {lease.uid for lease in leases if lease} == four_uids
        assert all(lease.private for lease in leases)
        assert sandbox._lease_uid() is None  # all taken (and nobody unmapped): no uid switch, never a shared uid
    finally:
        for lease in leases:
            if lease:
                lease.release()
    assert os.listdir(sandbox.UID_LEASES) == []  # released leases leave nothing behind
    again = sandbox._lease_uid()
    assert again.uid in four_uids
    again.release()


def test_uid_leases_are_private_across_processes(four_uids):
    holder = CHILD_PRELUDE + f'''
sandbox._uid_ranges = {sandbox._uid_ranges!r}
sandbox.UID_LEASES = {sandbox.UID_LEASES!r}
lease = sandbox._lease_uid()
print(lease.uid if lease else None, flush=True)
sys.stdin.read()  # hold it until the parent closes our stdin
lease.release()
'''
    children = [subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    mine = []
    try:
        theirs = [int(child.stdout.readline()) for child in children]  # each holds its lease once it has printed
        mine = [sandbox._lease_uid(), sandbox._lease_uid()]
        assert {lease.uid for lease in mine if lease} | set(theirs) == four_uids
        assert sandbox._lease_uid() is None
        children[0].kill()  # dies holding its lease: the kernel drops the lock, the file stays
        children[1].stdin.close()  # releases it
        assert [child.wait(timeout=SLACK) for child in children] == [-signal.SIGKILL, 0]
        mine += [sandbox._lease_uid(), sandbox._lease_uid()]
        assert {lease.uid for lease in mine[2:] if lease} == set(theirs)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
        for lease in mine:
            if lease:
                lease.release()
    assert os.listdir(sandbox.UID_LEASES) == []


WAITER = '''
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
print("uid", os.getuid(), flush=True)
'''
LOOPER = "import os\nprint('uid', os.getuid(), flush=True)\nwhile True:\n    pass\n" + CORRECT


def beside_a_killed_run(t: str, in_process: bool, prelude: str = "") -> tuple[sandbox.Result, sandbox.Result]:
    """Start a program that waits for SIGUSR1 (named `t`) in a thread or another process; once it runs,
    run another to its timeout here (killed: its group, and its uid when private); then signal the
    first. Returns both results; asserts the first was still running after the kill."""
    waiter = WAITER + name_as(t) + "assert signal.sigtimedwait([signal.SIGUSR1], 600), 'no signal'\n" + CORRECT
    script = CHILD_PRELUDE + prelude + f"res = sandbox.run({waiter!r}, 600)\nprint(json.dumps(res.__dict__))\n"
    with ThreadPoolExecutor(1) as pool:
        if in_process:
            fut = pool.submit(sandbox.run, waiter, 600)
        else:
            fut = pool.submit(subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=600)
        deadline = time.monotonic() + SLACK
        while not (pids := live(t)) and not fut.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pids, f"the waiting program did not start: {fut.result() if fut.done() else 'not within 60 s'}"
        killed = sandbox.run(LOOPER, 1)
        assert killed.status == "timeout", killed
        assert live(t) == pids, "killing one run killed another run's program"
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        out = fut.result()
    if not in_process:
        assert out.returncode == 0, out.stderr
        out = sandbox.Result(**json.loads(out.stdout.strip().splitlines()[-1]))
    return out, killed


def uid_of(res: sandbox.Result) -> int:
    return int(res.stdout_tail.split("uid ")[1].split()[0])


def switches_uid() -> bool:
    """Whether runs here switch uid: as root, unless rlimits-only with an interpreter others cannot reach."""
    return os.geteuid() == 0 and (sandbox.isolation() != "rlimits-only" or sandbox._others_can_run_python())


@pytest.mark.parametrize("in_process", [True, False], ids=["threads", "processes"])
def test_concurrent_runs_get_their_own_uids_and_one_kill_spares_the_other(in_process):
    waiting, killed = beside_a_killed_run(tag("w" + "tp"[in_process]), in_process)
    assert (waiting.passed, waiting.status) == (True, "passed"), waiting
    if switches_uid():  # each run has a uid of its own (as another user, none switches uid)
        assert uid_of(waiting) != uid_of(killed)
        assert min(uid_of(waiting), uid_of(killed)) >= sandbox.UID_FLOOR


@pytest.mark.skipif(os.geteuid() != 0, reason="uids are switched only by a root harness")
@pytest.mark.parametrize("in_process", [True, False], ids=["threads", "processes"])
def test_without_a_private_uid_runs_share_nobody_but_never_kill_by_uid(in_process, monkeypatch):
    narrow = [(0, 65536)]  # a narrow uid map: nobody (65534) is there, nothing from 100000 up
    monkeypatch.setattr(sandbox, "_uid_ranges", narrow)
    monkeypatch.setattr(sandbox, "_warned_shared", False)
    if not switches_uid():
        pytest.skip("runs here stay root: rlimits-only with an interpreter other users cannot reach")
    with pytest.warns(RuntimeWarning, match="shared uid 65534"):
        lease = sandbox._lease_uid()
    assert (lease.uid, lease.private) == (sandbox.SHARED_UID, False)
    lease.release()
    # The host's own nobody process, and a concurrent run's program, both outlive a run killed for its timeout.
    bystander = subprocess.Popen([shutil.which("sleep"), "600"], user=sandbox.SHARED_UID, group=sandbox.SHARED_UID)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the child process warns again, on its stderr
            waiting, killed = beside_a_killed_run(tag("n" + "tp"[in_process]), in_process,
                                                  f"sandbox._uid_ranges = {narrow!r}\n")
        assert bystander.poll() is None, "a run killed the host's nobody processes"
    finally:
        bystander.kill()
        bystander.wait()
    assert (waiting.passed, waiting.status) == (True, "passed"), waiting
    assert uid_of(waiting) == uid_of(killed) == sandbox.SHARED_UID


@pytest.mark.skipif(os.geteuid() != 0, reason="uids are switched only by a root harness")
@pytest.mark.parametrize("mode", [m for m in ("bwrap", "unshare") if shutil.which(m)])
def test_without_a_private_uid_the_pid_namespace_still_ends_detached_processes(mode, monkeypatch):
    monkeypatch.setattr(sandbox, "_uid_ranges", [(0, 65536)])
    monkeypatch.setattr(sandbox, "_warned_shared", True)
    t = tag("ns" + mode[0])
    res = sandbox.run(name_as(t) + "import os\nprint('uid', os.getuid())\n" + DETACHED, mode=mode)
    assert res.passed and uid_of(res) == sandbox.SHARED_UID, res
    assert gone(t), "a detached grandchild outlived its run"
