"""Many-shot GSM8K (50 shots, offline) and the shot-count sweep (1, 2, 4, 8 shots)."""

from __future__ import annotations

import json

import pytest

import kvbench
from kvbench.cli import parser
from kvbench.engine.prompts import build_prompt
from kvbench.errors import KvbenchError
from kvbench.evaluation import evaluate
from kvbench.methods import make_method
from kvbench.tasks import make_task
from kvbench.tasks.gsm8k import POOL

N_TEST = 1319


def _shots(sample) -> list[str]:
    return [p.text for p in sample.parts if p.kind == "shot"]


def _question(text: str) -> str:
    return text.removeprefix("Question: ").split("\nAnswer:")[0].strip()


@pytest.fixture(scope="module")
def standard():
    return make_task("gsm8k").samples()


@pytest.fixture(scope="module")
def fifty():
    return make_task("gsm8k", shots=50).samples()


def test_fifty_shots_are_the_8_exemplars_then_42_held_out_test_rows(standard, fifty):
    shots = _shots(fifty[0])
    assert len(shots) == 50 and shots[:8] == _shots(standard[0])
    pool = {_question(s.parts[-1].text) for s in standard[N_TEST - POOL:]}
    extra = [_question(s) for s in shots[8:]]
    assert len(set(extra)) == 42 and set(extra) <= pool
    assert all(s.startswith("Question: ") and s.endswith(".\n\n") and "The answer is " in s and "<<" not in s
               for s in shots[8:])
    assert all(_shots(s) == shots for s in fifty[:: 200])  # the same shots for every question


def test_the_evaluation_set_excludes_the_rows_used_as_shots(standard, fifty):
    assert len(standard) == N_TEST and len(fifty) == N_TEST - POOL
    shot_questions = {_question(s) for s in _shots(fifty[0])}
    assert not shot_questions & {_question(s.parts[-1].text) for s in fifty}
    assert f"gsm8k/test/{N_TEST - POOL}" not in {s.id for s in fifty}
    # The pool is the file's tail: the first questions are the same at every shot count.
    assert [s.id for s in fifty[:50]] == [s.id for s in standard[:50]]
    assert [s.answer for s in fifty[:50]] == [s.answer for s in standard[:50]]


def test_the_shot_spans_of_a_fifty_shot_prompt_decode_to_the_shots(fifty, default_tokenizer, default_window):
    tok = default_tokenizer
    built = build_prompt(list(fifty[0].parts), tok)
    assert len(built.segments) == 51 and [s.kind for s in built.segments] == ["shot"] * 50 + ["question"]
    for part, seg in zip(fifty[0].parts, built.segments):
        assert tok.decode(built.input_ids[seg.start:seg.end]).strip() == part.text.strip()
    assert all(a.end == b.start for a, b in zip(built.segments, built.segments[1:]))  # contiguous, in order
    assert default_window == 8192
    assert len(built.input_ids) + make_task("gsm8k").config.max_new_tokens <= default_window  # 50 shots fit


def test_the_extra_shots_are_seeded():
    a, b = (_shots(make_task("gsm8k", shots=20, seed=s).samples(limit=1)[0]) for s in (1, 1))
    c = _shots(make_task("gsm8k", shots=20, seed=2).samples(limit=1)[0])
    assert a == b and a[:8] == c[:8] and a[8:] != c[8:]


def test_the_offline_pool_bounds_the_shot_count():
    assert len(_shots(make_task("gsm8k", shots=8 + POOL).samples(limit=1)[0])) == 8 + POOL
    with pytest.raises(KvbenchError, match="train_path=FILE"):
        make_task("gsm8k", shots=9 + POOL)


def test_a_train_file_replaces_the_pool_and_nothing_is_held_out(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"}) + "\n"
                             for i in range(60)))
    samples = make_task("gsm8k", shots=50, train_path=str(train)).samples()
    assert len(samples) == N_TEST and all(s.startswith("Question: What is ") for s in _shots(samples[0])[8:])


def test_a_user_file_with_many_shots_draws_from_the_pool_and_keeps_all_its_rows(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": str(i)}) + "\n" for i in range(3)))
    samples = make_task("gsm8k", shots=12, path=str(f)).samples()
    assert len(samples) == 3 and len(_shots(samples[0])) == 12


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_the_shot_count_sweep_takes_the_first_exemplars_on_the_same_questions(standard, n):
    samples = make_task("gsm8k", shots=n).samples()
    assert _shots(samples[0]) == _shots(standard[0])[:n]
    assert len(samples) == N_TEST and [s.id for s in samples[:20]] == [s.id for s in standard[:20]]


def test_the_shot_count_is_a_cli_setting_of_eval():
    args = parser().parse_args(["eval", "--task", "gsm8k", "--shots", "50", "--method", "shotkv", "--ratio", "0.3"])
    assert args.shots == 50


@pytest.mark.real
def test_two_samples_of_fifty_shot_gsm8k_on_the_default_model():
    model, tok = kvbench.load_model()
    rows = evaluate(model, tok, make_task("gsm8k", shots=50), [make_method("shotkv", ratio=0.3, prefill_only=True)],
                    limit=2, progress=False, max_new_tokens=4)
    assert len(rows) == 4 and [r.sample for r in rows[::2]] == ["gsm8k/test/0", "gsm8k/test/1"]
    for r in rows:
        assert r.score in (0.0, 1.0) and r.prompt_tokens > 6000
    cut = [r for r in rows if r.config != "full"]
    # ShotKV keeps whole shots within 30%: with 50 shots the budget is met closely, from below.
    assert all(0.2 * r.prompt_tokens < r.kept_tokens <= 0.3 * r.prompt_tokens + 1 for r in cut)
    assert all(r.kl > 0 for r in cut)
