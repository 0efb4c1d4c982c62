"""Run untrusted generated Python (HumanEval completions) in a contained subprocess.

Each program runs in its own process tree with:

* isolation, the strongest that works here (probed once, see `isolation()`):
  ``bwrap``: bubblewrap with new network, PID, IPC and UTS namespaces, a read-only view of
  ``/``, private size-capped tmpfs ``/tmp`` (the working directory lives there) and ``/run``,
  home directories hidden; ``unshare``: new network, PID and mount namespaces with private
  tmpfs over the world-writable directories; ``rlimits-only``: rlimits, a fresh host
  directory and an in-process socket block (weakest, warned about once);
* when the harness is root, a fresh unprivileged uid per run, so RLIMIT_NPROC is enforced (the
  kernel never enforces it for uid 0, not even in a user namespace) and only world-readable
  things are reachable; leftover processes of that uid are killed after each run (in
  rlimits-only mode, with an interpreter in a directory others cannot enter, e.g. pyenv under
  /root, the program stays root: no process limit, warned). As another user, bwrap and unshare
  make a user namespace, where the process limit counts the sandbox's own processes only;
* no two runs share a private uid: each is leased, from the mapped uids at 100000 and up (less
  any in use, or in /etc/subuid, e.g. rootless containers), with an exclusive ``flock`` on
  ``UID_LEASES/<uid>`` held until its leftovers are killed. flock, not fcntl locks, so threads of
  one process exclude each other too, and the kernel drops it when a process dies: no stale
  leases. Killing by uid is safe only for such a uid. Where none can be had (a narrow uid map),
  runs share uid 65534 (nobody) and are never killed by uid, which would kill concurrent runs
  and the host's own nobody daemons: only by process group, and in bwrap and unshare by the end
  of the PID namespace, which takes every process in it. That beats staying root (no process
  limit, root's files readable); what it gives up, warned once: a process limit shared with the
  other nobody processes (the limit is raised by their count at the start) and, in rlimits-only
  mode only, a detached process can outlive its run and reach concurrent runs;
* rlimits: CPU seconds, address space, processes, file size, open files, no core dumps;
* a wall-clock timeout that kills the whole process group (and with it the PID namespace);
* a scrubbed environment and stdin at /dev/null.

A pass is judged by a positive signal only: a nonce, generated per run and handed over on a
pipe that the driver reads only after the program (which ends with ``check(...)``) has
returned, is written to a result file that is not the program's stdout. Exiting early
(``sys.exit(0)``, ``os._exit(0)``), crashing, being killed or printing "PASS" never passes.
The program runs in the same process as the driver, so code written to attack this harness
(reading the nonce pipe itself) could forge a pass; that is a cheat to look for in outputs,
not something a sandbox in one process can rule out.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from kvbench.errors import KvbenchError

MODES = ("bwrap", "unshare", "rlimits-only")
NPROC_LIMIT = 64  # processes and threads of the sandbox uid
FSIZE_LIMIT = 16 << 20  # bytes per file, stdout and stderr included
NOFILE_LIMIT = 256
TMPFS_BYTES = 64 << 20  # each private tmpfs (/tmp, which holds the working directory)
TAIL_BYTES = 4096
UID_LEASES = "/tmp/kvbench-uid-leases"  # root only: one flock'ed file per private uid in use (fixed, not TMPDIR)
UID_FLOOR, UID_CEIL = 100_000, 1 << 30  # private uids come from here (below: system and regular users)
SHARED_UID = 65534  # nobody, when no private uid is mapped: never killed by uid
INSIDE_WORKDIR = "/tmp/kvbench-work"  # the working directory inside the namespace modes
PATH = "/usr/local/bin:/usr/bin:/bin"
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")  # /run (and /run/lock) is hidden whole

# Runs inside the sandbox as `python -s -S -c DRIVER CONFIG`; trusted until it execs the program.
DRIVER = r'''
import json, os, sys
cfg = json.loads(sys.argv[1])
if sys.path and sys.path[0] == "":
    del sys.path[0]
import builtins, resource, traceback
chunks = []
while True:
    chunk = os.read(0, 1 << 20)
    if not chunk:
        break
    chunks.append(chunk)
source = b"".join(chunks)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
except Exception:
    libc = None
if libc is not None:
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binaries from here on


def mount(src, dst, fstype, flags, opts):
    if libc is None or libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags,
                                  opts and opts.encode()) != 0:
        raise SystemExit("kvbench sandbox: cannot mount %s on %s (errno %s)" % (src, dst, ctypes.get_errno()))


plan = cfg["mounts"]  # own mount namespace (unshare mode, root): what bwrap does, by hand
if plan:
    NOSUID_NODEV, BIND, REC, REMOUNT, RDONLY = 2 | 4, 4096, 16384, 32, 1
    keep = [os.open(d, os.O_PATH) for d in plan["binds"]]  # reachable after their parents are covered
    for d in plan["hide"]:
        mount("tmpfs", d, "tmpfs", NOSUID_NODEV, "size=1048576,mode=755")
    for d in plan["private"]:
        if os.path.isdir(d) and not os.path.islink(d) and not any(d.startswith(h + "/") for h in plan["hide"]):
            mount("tmpfs", d, "tmpfs", NOSUID_NODEV, "size=%d,mode=1777" % cfg["tmpfs_bytes"])
    for d in plan["dirs"]:
        os.mkdir(d, 0o755)
    for d, fd in zip(plan["binds"], keep):
        os.mkdir(d, 0o755)
        mount("/proc/self/fd/%d" % fd, d, None, BIND | REC, None)
        mount(None, d, None, BIND | REMOUNT | RDONLY | NOSUID_NODEV, None)
        os.close(fd)
wd = cfg["workdir"]
os.makedirs(wd, exist_ok=True)
uid = cfg["uid"]
if uid is not None:
    os.chown(wd, uid, uid)
    os.chmod(wd, 0o700)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
        raise SystemExit("kvbench sandbox: dropping privileges failed")
os.chdir(wd)
if cfg["nproc_on_top"]:
    mine = 0
    for pid in os.listdir("/proc"):
        try:
            if os.stat("/proc/" + pid).st_uid == os.getuid():
                mine += len(os.listdir("/proc/%s/task" % pid))
        except (OSError, ValueError):
            pass
    cfg["limits"] = [(n, v + mine if n == "RLIMIT_NPROC" else v) for n, v in cfg["limits"]]
for name, value in cfg["limits"]:
    res = getattr(resource, name)
    soft, hard = value if isinstance(value, list) else (value, value)
    cur = resource.getrlimit(res)[1]
    if cur != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur), min(hard, cur)
    resource.setrlimit(res, (soft, hard))
if cfg["block_net"]:
    import _socket
    import socket

    def _no_net(*args, **kwargs):
        raise PermissionError(1, "network access is disabled in the kvbench sandbox")

    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _no_net()

    for mod in (socket, _socket):
        mod.socket = mod.SocketType = _NoSocket
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(mod, name):
                setattr(mod, name, _no_net)
builtins.exit = builtins.quit = sys.exit  # -S skips site, which defines them
result = cfg["result_fd"]
os.write(result, b"started\n")
try:
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except BaseException:
    try:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(1)
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
os.write(result, b"nonce:" + os.read(cfg["nonce_fd"], 64) + b"\n")
os._exit(0)
'''


@dataclass(frozen=True)
class Result:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error" (the sandbox could not run it)
    stdout_tail: str
    stderr_tail: str
    isolation: str  # "bwrap" | "unshare" | "rlimits-only"


_lock = threading.Lock()
_chosen: str | None = None
_warned = False


def isolation() -> str:
    """The strongest isolation that works here, probed once: "bwrap", "unshare" or "rlimits-only"."""
    global _chosen, _warned
    with _lock:
        if _chosen is None:
            errors = {}
            for mode in MODES:
                if mode in TOOLS and shutil.which(TOOLS[mode]) is None:
                    errors[mode] = "not installed"
                    continue
                res = _run(PROBE, 10.0, 256, mode)
                if res.passed:
                    _chosen = mode
                    break
                errors[mode] = (res.stderr_tail.strip().splitlines() or [res.status])[-1]
            else:
                raise KvbenchError(f"cannot run generated code in a subprocess here ({errors}); "
                                   "fix: check that this Python can start subprocesses")
            if _chosen != "bwrap" and not _warned:
                _warned = True
                why = errors["bwrap"] if errors["bwrap"] == "not installed" else f"failed ({errors['bwrap']})"
                weaker = WEAKER[_chosen]
                if _chosen == "rlimits-only" and os.geteuid() == 0 and not _others_can_run_python():
                    weaker += ", and as root (this Python is in a directory other users cannot enter): no process limit"
                warnings.warn(f"kvbench: bubblewrap (bwrap) {why}; generated code runs with weaker isolation "
                              f"({_chosen}: {weaker}); fix: apt-get install -y bubblewrap",
                              RuntimeWarning, stacklevel=2)
    return _chosen


def python() -> str:
    """The base interpreter, not a virtualenv's: sandboxed code runs with -s -S and needs only the
    standard library, and a venv may live where the sandbox hides (e.g. under /tmp, which bwrap replaces)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


TOOLS = {"bwrap": "bwrap", "unshare": "unshare"}
PROBE = "import math\nassert math.sqrt(4) == 2\n"
WEAKER = {
    "unshare": "no read-only view of /, host files writable by others stay writable",
    "rlimits-only": "network blocked only inside Python, host /tmp writable, no PID namespace",
}


def run_tests(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> bool:
    """True only if the program (a completion followed by its tests and `check(...)`) ran to its end."""
    res = run(program, timeout, memory_mb)
    if res.status == "error":
        last = (res.stderr_tail.strip().splitlines() or ["no output"])[-1]
        raise KvbenchError(f"the {res.isolation} sandbox could not start the program ({last}); "
                           f"fix: raise memory_mb (now {memory_mb}), "
                           "or see what `python -m kvbench.tasks.sandbox` reports")
    return res.passed


def run(program: str, timeout: float = 10.0, memory_mb: int = 1024, *, mode: str | None = None) -> Result:
    """Run `program` contained; `mode` forces an isolation (tests), default the one `isolation()` picks."""
    if not isinstance(program, str):
        raise KvbenchError(f"program must be Python source text, got {type(program).__name__}; fix: pass a str")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise KvbenchError(f"timeout must be a positive number of seconds, got {timeout!r}; fix: e.g. timeout=10")
    if not (isinstance(memory_mb, int) and memory_mb >= 64):
        raise KvbenchError(f"memory_mb must be an int of at least 64 (a Python process needs that), "
                           f"got {memory_mb!r}; fix: e.g. memory_mb=1024")
    if mode is None:
        mode = isolation()
    elif mode not in MODES:
        raise KvbenchError(f"unknown sandbox mode {mode!r}; fix: use one of {', '.join(MODES)}")
    return _run(program, float(timeout), memory_mb, mode)


def _run(program: str, timeout: float, memory_mb: int, mode: str) -> Result:
    root = os.geteuid() == 0
    lease = None
    # In rlimits-only mode with the interpreter in a private directory: stay root (weaker, see isolation()).
    if root and (mode != "rlimits-only" or _others_can_run_python()):
        lease = _lease_uid()
    try:
        return _run_as(program, timeout, memory_mb, mode, root, lease)
    finally:
        if lease is not None:
            lease.release()  # only now: its leftover processes are gone


def _run_as(program: str, timeout: float, memory_mb: int, mode: str, root: bool, lease: _Lease | None) -> Result:
    uid = lease.uid if lease is not None else None
    nproc = NPROC_LIMIT
    if lease is not None and not lease.private:
        nproc += _tasks_of(uid)  # shared with the host's (and concurrent runs') nobody processes
    base = Path(tempfile.mkdtemp(prefix="kvbench-sandbox-"))
    try:
        os.chmod(base, 0o711)  # the uid may pass through to base/work (rlimits-only), not list it
        workdir = INSIDE_WORKDIR if mode != "rlimits-only" else str(base / "work")
        (base / "program.py").write_text(program, encoding="utf-8")
        cpu = math.ceil(timeout) + 1
        cfg = {
            "workdir": workdir, "uid": uid, "block_net": mode == "rlimits-only",
            "mounts": dict(_mount_plan(), private=WORLD_WRITABLE) if mode == "unshare" else None,
            # Same uid as the harness, no user namespace: the limit counts all of this user's tasks.
            "nproc_on_top": mode == "rlimits-only" and uid is None and not root,
            "tmpfs_bytes": TMPFS_BYTES,
            "limits": [("RLIMIT_CPU", [cpu, cpu + 1]), ("RLIMIT_AS", memory_mb << 20),
                       ("RLIMIT_NPROC", nproc), ("RLIMIT_FSIZE", FSIZE_LIMIT),
                       ("RLIMIT_NOFILE", NOFILE_LIMIT), ("RLIMIT_CORE", 0)],
        }
        env = {"PATH": PATH, "HOME": workdir, "TMPDIR": "/tmp" if mode != "rlimits-only" else workdir,
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONIOENCODING": "utf-8"}
        nonce = secrets.token_hex(16).encode()
        nonce_r, nonce_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        with open(base / "program.py", "rb") as stdin, open(base / "stdout", "wb") as out, \
                open(base / "stderr", "wb") as err, open(base / "result", "wb") as result:
            cfg["nonce_fd"], cfg["result_fd"] = nonce_r, result.fileno()
            cmd = _wrapper(mode, root) + [python(), "-s", "-S", "-c", DRIVER, json.dumps(cfg)]
            try:
                proc = subprocess.Popen(cmd, stdin=stdin, stdout=out, stderr=err, env=env, cwd="/",
                                        pass_fds=(nonce_r, result.fileno()), start_new_session=True)
            except OSError as e:  # e.g. the isolation tool vanished
                return Result(False, "error", "", f"{cmd[0]}: {e}", mode)
            finally:
                os.close(nonce_r)
            timed_out = not _wait_unreaped(proc.pid, timeout)
            _kill_group(proc.pid)  # before reaping the leader, so its pid still names our group
            code = proc.wait()
            if lease is not None and lease.private:  # never a shared uid: that would kill others' processes
                _kill_uid(uid)
        text = (base / "result").read_bytes()
        tail_out, tail_err = _tail(base / "stdout"), _tail(base / "stderr")
    finally:
        _rmtree(base)
    if b"nonce:" + nonce + b"\n" in text.splitlines(keepends=True):
        status = "passed"
    elif timed_out or code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        status = "timeout"
    elif not text.startswith(b"started\n"):
        status = "error"
    else:
        status = "failed"
    return Result(status == "passed", status, tail_out, tail_err, mode)


def _wrapper(mode: str, root: bool) -> list[str]:
    if mode == "rlimits-only":
        return []
    if mode == "unshare":  # the driver applies the mount plan itself (as root, in its own mount namespace)
        return ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts"] + (
            [] if root else ["--map-root-user"])
    plan = _mount_plan()
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp"]
    for d in plan["hide"]:
        args += ["--tmpfs", d]
    for d in plan["dirs"]:  # bwrap would make them 0700, closed to the sandbox uid
        args += ["--perms", "0755", "--dir", d]
    for d in plan["binds"]:
        args += ["--ro-bind", d, d]
    return args + ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                   "--die-with-parent", "--"]


_plan: dict | None = None


def _mount_plan() -> dict:
    """Directories to cover with an empty tmpfs (homes, /run with its sockets, and any closed directory
    the interpreter lives in), and the interpreter's own directories to bind back read-only."""
    global _plan
    if _plan is None:
        needed = sorted({os.path.realpath(p) for p in (sys.base_prefix, os.path.dirname(python()))})
        hide = [d for d in ("/root", "/home", "/run", os.environ.get("HOME")) if d and os.path.isdir(d) and d != "/"]
        hide = [os.path.realpath(d) for d in hide]
        hide += [b for b in map(_first_closed_ancestor, needed) if b]
        hide = sorted(set(hide), key=len)
        hide = [d for i, d in enumerate(hide) if not any(d.startswith(h + "/") for h in hide[:i])]
        dirs, binds = [], []
        for d in needed:
            under = [h for h in hide if d == h or d.startswith(h + "/")]
            if not under or any(d.startswith(n + "/") for n in needed):
                continue  # visible as it is, or bound with its parent
            parts = Path(d).parts
            for i in range(len(Path(under[0]).parts) + 1, len(parts)):
                p = os.path.join(*parts[:i])
                if p not in dirs:
                    dirs.append(p)
            binds.append(d)
        _plan = {"hide": hide, "dirs": dirs, "binds": binds}
    return _plan


def _first_closed_ancestor(path: str) -> str | None:
    """The outermost directory on `path` that other users cannot enter, if any."""
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        d = os.path.join(*parts[:i])
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except OSError:
            return None
    return None


def _others_can_run_python() -> bool:
    dirs = {os.path.realpath(p) for p in (sys.base_prefix, os.path.dirname(python()))}
    return not any(_first_closed_ancestor(d) for d in dirs) and bool(os.stat(python()).st_mode & 0o001)


_uid_ranges: list[tuple[int, int]] | None = None
_warned_shared = False
MAX_PROBES = 4096  # uids tried per lease before settling for the shared one


class _Lease:
    """A uid for one run. `private`: no other run, in any thread or process, holds it until `release()`."""

    def __init__(self, uid: int, private: bool, fd: int | None = None, dir_fd: int | None = None):
        self.uid, self.private, self._fd, self._dir_fd = uid, private, fd, dir_fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # unlinked while still locked, so a later taker never locks a file that is on its way out
            os.unlink(str(self.uid), dir_fd=self._dir_fd)
        except OSError:
            pass
        os.close(self._fd)
        os.close(self._dir_fd)
        self._fd = self._dir_fd = None


def _uid_map() -> list[tuple[int, int]]:
    global _uid_ranges
    if _uid_ranges is None:
        try:
            lines = Path("/proc/self/uid_map").read_text().split("\n")
            _uid_ranges = [(int(a), int(a) + int(n)) for a, _, n in (ln.split() for ln in lines if ln.strip())]
        except (OSError, ValueError):
            _uid_ranges = []
    return _uid_ranges


def _free_ranges() -> list[tuple[int, int]]:
    """The mapped uids from UID_FLOOR up, less the ranges /etc/subuid hands out (rootless containers)."""
    free = [(max(lo, UID_FLOOR), min(hi, UID_CEIL)) for lo, hi in _uid_map()]
    try:
        rows = [ln.split(":") for ln in Path("/etc/subuid").read_text().splitlines()]
        holes = [(int(f[1]), int(f[1]) + int(f[2])) for f in rows if len(f) == 3 and f[1].isdigit() and f[2].isdigit()]
    except OSError:
        holes = []
    free = [(lo, hi) for lo, hi in free if lo < hi]
    for a, b in holes:
        free = [(x, y) for lo, hi in free for x, y in ((lo, min(hi, a)), (max(lo, b), hi)) if x < y]
    return free


def _lease_uid() -> _Lease | None:
    """A private uid (see the module docstring), else the shared nobody uid, else None (stay root)."""
    global _warned_shared
    free = _free_ranges()
    if free:
        busy = _uids_in_use()
        total = sum(hi - lo for lo, hi in free)
        start = random.SystemRandom().randrange(total)
        dir_fd = _lease_dir()
        try:
            for i in range(min(total, MAX_PROBES)):
                k = (start + i) % total
                for lo, hi in free:
                    if k < hi - lo:
                        uid = lo + k
                        break
                    k -= hi - lo
                if uid not in busy and (fd := _try_lock(dir_fd, str(uid))) is not None:
                    return _Lease(uid, True, fd, dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        os.close(dir_fd)
    if not any(lo <= SHARED_UID < hi for lo, hi in _uid_map()):
        return None
    if not _warned_shared:
        _warned_shared = True
        warnings.warn(f"kvbench: no private uid is free in this user namespace's uid map ({_uid_map()}); generated "
                      f"code runs as the shared uid {SHARED_UID} (nobody), whose processes are never killed by uid: "
                      "its process limit is shared with other nobody processes and, in rlimits-only mode, a detached "
                      f"process can outlive its run; fix: map uids from {UID_FLOOR} up (e.g. a container with a "
                      "wider uid range)", RuntimeWarning, stacklevel=4)
    return _Lease(SHARED_UID, False)


def _lease_dir() -> int:
    """UID_LEASES, opened; it must be a directory of this user that others cannot write to."""
    try:
        os.mkdir(UID_LEASES, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise KvbenchError(f"cannot create {UID_LEASES}, where the sandbox leases its uids ({e}); "
                           "fix: make /tmp writable") from e
    try:
        fd = os.open(UID_LEASES, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise KvbenchError(f"cannot open {UID_LEASES}, where the sandbox leases its uids ({e}); fix: remove it") from e
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise KvbenchError(f"{UID_LEASES}, where the sandbox leases its uids, belongs to uid {st.st_uid} or is "
                           f"writable by others (mode {st.st_mode & 0o777:o}); fix: remove it")
    return fd


def _try_lock(dir_fd: int, name: str) -> int | None:
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            return fd  # the file still in place, not one its holder unlinked as we opened it
    except OSError:  # held (BlockingIOError), or released and unlinked meanwhile
        pass
    os.close(fd)
    return None


def _proc_uids() -> list[tuple[int, list[int]]]:
    """(pid, [real, effective, saved, fs uid]) of every process here (stat's owner of /proc/<pid> is
    root for a process that is not dumpable, e.g. one that changed its uid: hence the status file)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        line = next((ln for ln in status.splitlines() if ln.startswith("Uid:")), "")
        out.append((int(entry), [int(u) for u in line.split()[1:]]))
    return out


def _uids_in_use() -> set[int]:
    return {u for _, uids in _proc_uids() for u in uids}


def _tasks_of(uid: int) -> int:
    """Processes and threads whose real uid is `uid` (what RLIMIT_NPROC counts)."""
    n = 0
    for pid, uids in _proc_uids():
        if uids[:1] == [uid]:
            try:
                n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return n


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait for `pid` to exit without reaping it; False on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None and info.si_pid == pid:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is the run's own leased uid, until none is left."""
    for _ in range(100):
        found = False
        for pid, uids in _proc_uids():
            if uids[:1] == [uid]:
                found = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(0.01)


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def _rmtree(path: Path) -> None:
    def fix(func, p, _exc):
        try:  # a program may leave directories without write or search permission
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    print(isolation())
