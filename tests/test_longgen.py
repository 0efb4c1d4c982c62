"""LongGenBench-style long generation: K questions in one prompt, answers split by their numbered markers."""

from __future__ import annotations

import pytest
import torch
from conftest import task_samples
from transformers import LlamaConfig, LlamaForCausalLM

from kvbench.engine.attention import register
from kvbench.engine.prompts import build_prompt
from kvbench.errors import KvbenchError
from kvbench.evaluation import FULL, SampleRun, evaluate
from kvbench.methods import keep_count, make_method
from kvbench.tasks import TASKS, list_tasks, make_task
from kvbench.tasks.longgen import position_accuracy, split_answers


@pytest.fixture(scope="module")
def gsm():
    return make_task("longgen", k=3)  # 8 exemplars: questions are numbered 9, 10, 11


@pytest.fixture(scope="module")
def sample(gsm):
    return gsm.samples(1)[0]  # gold answers 18, 3, 70000 (GSM8K test rows 0-2)


def _answers(*blocks: str) -> str:
    return "".join(blocks)


# --------------------------------------------------------------------------- the prompt


def test_longgen_is_registered_as_long_context_generation():
    assert "longgen" in TASKS
    row = {t["name"]: t for t in list_tasks()}["longgen"]
    assert row["ability"] == "long-context generation" and row["output"] == "generate"


def test_the_prompt_numbers_demonstrations_then_the_k_questions_of_the_source_in_order(gsm, sample):
    source = make_task("gsm8k").samples(6)
    kinds = [p.kind for p in sample.parts]
    assert kinds == ["instruction"] + ["shot"] * 16 + ["question"] * 3
    shots = [p.text for p in sample.parts if p.kind == "shot"]
    assert [s.split(":")[0] for s in shots] == [f"Question_{i}" for i in range(1, 9)] + [f"Answer_{i}" for i in
                                                                                          range(1, 9)]
    assert shots[8].startswith("Answer_1:\nThere are 15 trees originally.")
    assert shots[8].endswith("The answer is 6.\n\n")
    questions = [p.text for p in sample.parts if p.kind == "question"]
    for i, (q, s) in enumerate(zip(questions, source)):
        body = s.parts[-1].text.removeprefix("Question: ").removesuffix("\nAnswer:")
        assert f"Question_{9 + i}:\n{body}\n\n" in q
    assert questions[0].startswith("Following Questions:\n") and questions[-1].endswith("\n\nAnswer_9:\n")
    assert sample.answer == "|".join(s.answer for s in source[:3]) == "18|3|70000"
    second = gsm.samples(2)[1]  # iteration 2: the next K questions
    assert second.answer == "|".join(s.answer for s in source[3:6])
    assert sample.meta["questions"] == ["gsm8k/test/0", "gsm8k/test/1", "gsm8k/test/2"]


def test_iterations_set_the_number_of_samples_and_limit_caps_them():
    assert len(make_task("longgen", k=2, iterations=7).samples()) == 7
    assert len(make_task("longgen", k=2, iterations=7).samples(limit=3)) == 3
    assert len(make_task("longgen").samples()) == 20  # T = 20, the study's


def test_generation_length_and_stops_follow_k(gsm):
    assert gsm.config.max_new_tokens == 3 * 128
    assert gsm.config.stop == ("Answer_12", "Question_12")  # an answer or question past the last one
    t = make_task("longgen", source_task="csqa", k=4, answer_tokens=10)
    assert t.config.max_new_tokens == 40 and t.config.stop == ("Answer_9", "Question_9")  # 4 shots + 4 questions
    assert make_task("longgen", k=35).config.max_new_tokens == 35 * 128  # the study's K
    zero = make_task("longgen", shots=0, k=2).samples(1)[0]  # no demonstrations: questions 1 and 2
    assert [p.kind for p in zero.parts] == ["instruction", "question", "question"]
    assert zero.parts[1].text.startswith("Following Questions:\nQuestion_1:") and zero.parts[2].text.endswith(
        "Answer_1:\n")


def test_mmlu_blocks_hold_one_subject_with_its_shots():
    t = make_task("longgen", source_task="mmlu", k=4)
    samples = t.samples(3)
    subjects = [s.meta["subject"] for s in samples]
    assert subjects == ["abstract_algebra", "anatomy", "astronomy"]
    mmlu = [s for s in task_samples("mmlu")[:57 * 4] if s.meta["subject"] == "anatomy"]
    assert samples[1].answer == "|".join(s.answer for s in mmlu[:4])
    assert "about anatomy." in samples[1].parts[0].text
    demo = [p.text for p in samples[1].parts if p.kind == "shot"]
    first_shot = [p.text for p in mmlu[0].parts if p.kind == "shot"][0]
    assert demo[0] == f"Question_1:\n{first_shot.rsplit(chr(10) + 'Answer:', 1)[0]}\n\n"
    assert demo[5] == f"Answer_1:\n{first_shot.rsplit('Answer:', 1)[1].strip()}\n\n"


@pytest.mark.parametrize("source", ["gsm8k", "mmlu", "csqa"])
def test_the_gold_target_scores_every_position(source):
    t = make_task("longgen", source_task=source, k=4)
    for s in t.samples(3):
        d = t.details(s, s.target)
        assert d["correct"] == [1.0] * 4 and d["answered"] == [True] * 4 and t.score(s, None, s.target) == 1.0
        assert d["extracted"] == s.answer.split("|")


def test_every_segment_decodes_to_its_part_under_the_real_tokenizer(sample, default_tokenizer):
    tok = default_tokenizer
    built = build_prompt(list(sample.parts), tok)
    for part, seg in zip(sample.parts, built.segments):
        assert tok.decode(built.input_ids[seg.start:seg.end]).strip() == part.text.strip()


def test_bad_settings_name_the_fix():
    with pytest.raises(KvbenchError, match="source_task"):
        make_task("longgen", source_task="humaneval")
    with pytest.raises(KvbenchError, match="k must be"):
        make_task("longgen", k=0)
    with pytest.raises(KvbenchError, match="unknown setting"):
        make_task("longgen", K=3)
    with pytest.raises(KvbenchError, match="smaller k"):
        make_task("longgen", k=2000).samples()


# --------------------------------------------------------------------------- extraction


def test_answers_in_order_are_split_by_their_markers(gsm, sample):
    out = _answers("16 - 3 - 4 = 9. 9 * 2 = 18. The answer is 18.\n\n",
                   "Answer_10:\n2 / 2 = 1. The answer is 4.\n\n",
                   "Answer_11:\nThe answer is 70,000.\n\n")
    d = gsm.details(sample, out)
    assert d["extracted"] == ["18", "4", "70000"] and d["correct"] == [1.0, 0.0, 1.0]
    assert gsm.score(sample, None, out) == pytest.approx(2 / 3)


def test_a_missing_answer_is_wrong_and_does_not_shift_the_others(gsm, sample):
    out = _answers("The answer is 18.\n\n", "Answer_11:\nThe answer is 70000.\n\n")
    d = gsm.details(sample, out)
    assert d["answered"] == [True, False, True] and d["correct"] == [1.0, 0.0, 1.0]
    assert gsm.filters()["strict-match"](out) == "18||70000"
    assert gsm.filters()["strict-match"]("I do not know.") is None  # nothing parsed: no agreement possible


def test_answers_out_of_order_go_to_their_numbers(gsm, sample):
    out = _answers("The answer is 18.\n\n", "Answer_11:\nThe answer is 70000.\n\n", "Answer_10:\nThe answer is 3.\n\n")
    assert gsm.details(sample, out)["correct"] == [1.0, 1.0, 1.0]


def test_two_answers_merged_in_one_block_are_split_into_the_missing_numbers(gsm, sample):
    merged = ("Janet makes 18 dollars.\nThe answer is 18.\nIt takes 3 bolts.\nThe answer is 3.\n\n"
              "Answer_11:\nThe answer is 7.")
    d = gsm.details(sample, merged)
    assert d["extracted"] == ["18", "3", "7"] and d["answered"] == [True, True, True]
    assert d["marked"] == [True, False, True]
    # On one line too, and only as many pieces as there are missing numbers.
    one_line = "She makes 9 * 2 = 18. The answer is 18. The answer is 3. The answer is 70000. The answer is 5."
    assert gsm.details(sample, one_line)["extracted"] == ["18", "3", "70000"]
    assert gsm.blocks(one_line)[2] == "The answer is 70000. The answer is 5."
    # A cut keeps the character after the number, which strict-match's final "." needs (else 18 -> "1").
    assert gsm.details(sample, "The answer is 18 The answer is 3 The answer is 70000 ")["extracted"] == [
        "18", "3", "70000"]
    # ... but never into a number that has its own block: then the block's first answer counts.
    own = "The answer is 18.\nThe answer is 5.\n\nAnswer_10:\nThe answer is 3.\n\nAnswer_11:\nThe answer is 7."
    assert gsm.details(sample, own)["extracted"] == ["18", "3", "7"]


def test_a_repeated_number_keeps_its_first_non_empty_block(gsm, sample):
    out = _answers("Answer_9:\nThe answer is 18.\n\n",  # the model repeats the primed marker: an empty first block
                   "Answer_10:\nThe answer is 3.\n\n", "Answer_10:\nThe answer is 4.\n\n",
                   "Answer_11:\nThe answer is 70000.\n\n")
    assert gsm.details(sample, out)["extracted"] == ["18", "3", "70000"]


def test_numbers_outside_the_prompt_and_repeated_questions_end_blocks(gsm, sample):
    out = _answers("The answer is 18.\n\n", "Question_10:\nA robe takes 2 bolts. The answer is 99.\n\n",
                   "Answer_10: The answer is 3.\n", "Answer_3:\nThe answer is 5.\n",
                   "Answer 11:\nThe answer is 70000.\n")
    d = gsm.details(sample, out)
    assert d["extracted"] == ["18", "3", "70000"]  # "Answer_3" is a demonstration's number: ignored


def test_split_answers_without_a_filter_only_splits_by_markers():
    text = "Answer_4:\nB\nC\n\nAnswer_6:\nA"
    assert split_answers(text, 4, 3) == ["B\nC\n\n", None, "A"]
    letters = make_task("longgen", source_task="csqa", k=3)  # 4 shots: questions 5, 6, 7
    assert letters.extract("B\nC\n\nAnswer_7:\nA")["letter"] == ["B", "C", "A"]


def test_position_accuracy_averages_details_per_position(gsm, sample):
    outs = ["The answer is 18.\n\nAnswer_10:\nThe answer is 3.\n\n", "The answer is 18.\n\n"]
    curve = position_accuracy([gsm.details(sample, o) for o in outs])
    assert curve == [1.0, 0.5, 0.0]
    assert position_accuracy([gsm.details(sample, o) for o in outs], "answered") == [1.0, 0.5, 0.0]


# --------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def tiny(default_tokenizer):
    """A tiny random Llama over the real tokenizer's vocabulary; its window is 4096 tokens."""
    tok = default_tokenizer
    register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("kvbench")
    model.generation_config.eos_token_id = None
    return model, tok


def test_a_prompt_past_the_window_gets_the_clear_error(tiny):
    model, tok = tiny
    task = make_task("longgen", k=60)  # ~5,000 prompt tokens > 4,096
    with pytest.raises(KvbenchError, match=r"exceeds the model's 4096-token window"):
        evaluate(model, tok, task, [make_method("shotkv", ratio=0.3)], limit=1, progress=False, max_new_tokens=4)


def test_shotkv_holds_the_generated_tokens_at_its_decoding_budget(tiny, gsm, sample):
    model, tok = tiny
    shotkv, prefill_only = make_method("shotkv", ratio=0.3), make_method("shotkv", ratio=0.3, prefill_only=True)
    run = SampleRun(model, tok, gsm, sample, [FULL, shotkv], chat=False)
    for method in (shotkv, prefill_only):
        _, cache = run.generate(method, 60, ())
        for layer in cache.layers:
            generated = layer.seen - layer.n_prompt
            held = layer.stored_length() - layer.n_prefill_slots
            assert generated == 59  # the first new token's logits come from the prompt's last token
            assert held == (18 if method is shotkv else 59)  # round(0.3 * 59): the decoding budget
        assert cache.nbytes() < cache.full_nbytes()


# --------------------------------------------------------------------------- end to end, default model


@pytest.mark.real
def test_two_samples_of_longgen_on_the_default_model(default_model):
    model, tok = default_model
    task = make_task("longgen", k=2)
    rows = evaluate(model, tok, task, [make_method("shotkv", ratio=0.3, prefill_only=True)], limit=2,
                    progress=False, max_new_tokens=24)
    assert len(rows) == 4 and {r.config for r in rows} == {"full", "shotkv@0.3[prefill_only=True]"}
    for r in rows:
        assert len(r.extra["correct"]) == 2 and len(r.extra["answered"]) == 2 and r.extra["answered"][0]
        assert r.score == sum(r.extra["correct"]) / 2 and r.output
    cut = [r for r in rows if r.config != "full"]
    assert all(r.kl > 0 and r.cache_bytes < r.full_cache_bytes for r in cut)
    assert len(position_accuracy([r.extra for r in rows if r.config == "full"])) == 2


@pytest.mark.real
def test_shotkv_evicts_generated_tokens_on_the_default_model(default_model):
    model, tok = default_model
    task = make_task("longgen", k=2)
    shotkv = make_method("shotkv", ratio=0.3)
    run = SampleRun(model, tok, task, task.samples(1)[0], [FULL, shotkv], chat=False)
    _, cache = run.generate(shotkv, 16, ())
    for layer in cache.layers:
        generated = layer.seen - layer.n_prompt
        assert generated == 15 and layer.stored_length() - layer.n_prefill_slots == keep_count(15, 0.3, None) == 5
