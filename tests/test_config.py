"""`kvbench run` validates everything up front: one line naming the problem and the fix, exit status 2."""

from __future__ import annotations

import pytest
import torch

from kvbench.cli import main
from kvbench.errors import KvbenchError
from kvbench.jobs.config import parse, read
from kvbench.store import Store

GOOD = "models: [smollm2-135m]\nmethods: [snapkv]\nratios: [0.5]\ntasks: [mmlu]\nlimit: 2\n"

# (config text or None for GOOD, extra CLI args, a fragment the one-line message must contain)
BAD = [
    ("models: [smollm2-135m\n", [], "not valid YAML at line"),
    ("- a\n- b\n", [], "top level must be a mapping"),
    (GOOD + "ratio: [0.5]\n", [], "unknown key 'ratio' (did you mean 'ratios'?)"),
    (GOOD.replace("[snapkv]", "[snapkvv]"), [], "unknown method 'snapkvv'"),
    (GOOD.replace("[snapkv]", "[{name: snapkv, settings: {windowsize: 8}}]"), [], "windowsize"),
    (GOOD.replace("[snapkv]", "[{name: snapkv, settings: {ratio: 0.2}}]"), [], "put ratios under 'ratios:'"),
    (GOOD.replace("[0.5]", "[1.5]"), [], "ratio 1.5 is outside (0, 1]"),
    (GOOD.replace("[0.5]", "[0]"), [], "ratio 0 is outside (0, 1]"),
    (GOOD.replace("[0.5]", "[-0.1]"), [], "outside (0, 1]"),
    (GOOD.replace("[0.5]", "[half]"), [], "ratio 'half' is not a number"),
    (None, ["--ratios", "0.3,x"], "give comma-separated numbers"),
    (GOOD.replace("[mmlu]", "[mmluu]"), [], "unknown task 'mmluu'"),
    (GOOD.replace("[mmlu]", "[{name: gsm8k, settings: {shotz: 4}}]"), [], "unknown setting shotz"),
    (GOOD.replace("[mmlu]", "[{name: gsm8k, settings: {path: /nonexistent/rows.jsonl}}]"), [],
     "/nonexistent/rows.jsonl"),
    (GOOD.replace("[mmlu]", "[{name: mmlu, limits: 3}]"), [], "unknown key 'limits' in task 'mmlu'"),
    (GOOD.replace("smollm2-135m", "no-such-model"), [], "unknown model 'no-such-model'"),
    (GOOD.replace("smollm2-135m", "/nonexistent/model-dir"), [], "not found: /nonexistent/model-dir"),
    (GOOD.replace("limit: 2", "limit: 0"), [], "limit must be a whole number >= 1"),
    (GOOD + "dtype: float8\n", [], "dtype 'float8' is not one of"),
    (GOOD + "device: tpu\n", [], "device 'tpu'"),
    (GOOD + "device: cuda\n", [], "no CUDA device here"),
    (GOOD + "executor: spark\n", [], "executor 'spark'"),
    (GOOD + "seed: -1\n", [], "seed must be a whole number >= 0"),
    (GOOD.replace("tasks: [mmlu]", "tasks: []"), [], "no tasks"),
    (GOOD.replace("methods: [snapkv]", "methods: [snapkv, snapkv]"), [], "snapkv@0.5 is listed twice"),
    (GOOD.replace("tasks: [mmlu]", "tasks: [mmlu, mmlu]"), [], "task mmlu is listed twice"),
    (GOOD + "protocol: lazy\n", [], "protocol 'lazy': use one of strict, after-prefill, question-agnostic"),
    (GOOD.replace("[mmlu]", "[{name: mmlu, protocol: [strict, strict]}]"), [], "give one or more different"),
    (GOOD.replace("[mmlu]", "[mmlu, {name: mmlu, protocol: strict}]"), [], "task mmlu is listed twice"),
    (None, ["--protocol", "after-prefil"], "protocol 'after-prefil'"),
]


@pytest.mark.parametrize("text,args,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, text, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "no CUDA device here" holds on a GPU host too
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(GOOD if text is None else text)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvbench: error: ") and "\n" not in err, err
    assert message in err, err
    assert not (out / "results.sqlite").exists()  # nothing started


@pytest.mark.real
def test_a_prompt_question_agnostic_cannot_run_fails_before_any_result(tmp_path, capsys):
    """Checked with the model's tokenizer (where the question starts), after the model loads, before any work."""
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(GOOD.replace("[mmlu]", "[{name: humaneval, settings: {shots: 0}}]")
                   + "protocol: question-agnostic\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kvbench: error: sample humaneval/HumanEval/0 of task humaneval[shots=0]@question-agnostic: "
                          "nothing comes before the question"), err
    assert len(Store(tmp_path / "run")) == 0


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config file" in err and "not found" in err and "quick" in err


def test_bad_input_keeps_stored_results(tmp_path, capsys):
    """A broken config on a run directory with results leaves them as they are."""
    store = Store(tmp_path)
    store.add([{"model": "m", "task_key": "t", "sample": "s", "config": "full", "score": 1.0}])
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(GOOD.replace("[0.5]", "[2]"))
    assert main(["run", str(cfg), "--out", str(tmp_path)]) == 2
    assert len(Store(tmp_path)) == 1


def test_cli_overrides_replace_lists_and_keep_entries():
    from types import SimpleNamespace

    from kvbench.cli import experiment

    args = SimpleNamespace(config="quick", model=None, methods="shotkv,streamingllm", tasks="gsm8k,csqa",
                           ratios="0.1", budgets=None, limit=2, executor=None, address=None, seed=None,
                           dtype=None, device=None, max_new_tokens=None)
    exp = experiment(args)
    assert [m.name for m in exp.methods] == ["shotkv", "streamingllm"]
    assert [t.name for t in exp.tasks] == ["gsm8k", "csqa"]
    quick_gsm8k = next(t for t in parse(read("quick")).tasks if t.name == "gsm8k")
    assert exp.tasks[0] == quick_gsm8k  # the config's own settings for a kept task survive
    assert exp.ratios == (0.1,) and exp.limit == 2


def test_task_key_names_settings():
    exp = parse({"methods": ["snapkv"], "tasks": [{"name": "gsm8k", "settings": {"shots": 4}}, "mmlu"]})
    assert [t.key for t in exp.tasks] == ["gsm8k[shots=4]", "mmlu"]
    assert [m.ratio for m in exp.method_objects()] == [0.3]


def test_protocols_are_part_of_a_task_s_key_and_a_list_runs_each():
    exp = parse({"methods": ["snapkv"], "protocol": ["strict", "after-prefill"],
                 "tasks": ["mmlu", {"name": "gsm8k", "settings": {"shots": 4}, "protocol": "question-agnostic"}]})
    assert [(t.key, t.protocol) for t in exp.tasks] == [("mmlu", "strict"), ("mmlu@after-prefill", "after-prefill"),
                                                         ("gsm8k[shots=4]@question-agnostic", "question-agnostic")]
    assert parse({"methods": ["snapkv"], "tasks": ["mmlu"]}).tasks[0].protocol == "strict"  # the default, unnamed


def test_the_command_line_s_protocols_replace_every_task_s():
    from kvbench.jobs.config import overridden

    data = {"methods": ["snapkv"], "tasks": ["mmlu", {"name": "gsm8k", "protocol": "strict", "limit": 2}]}
    exp = parse(overridden(data, protocol=["after-prefill", "question-agnostic"]))
    assert [t.key for t in exp.tasks] == ["mmlu@after-prefill", "mmlu@question-agnostic", "gsm8k@after-prefill",
                                          "gsm8k@question-agnostic"]
    assert exp.tasks[-1].limit == 2  # the task's other keys are kept


def test_method_ratios_override_the_config():
    exp = parse({"methods": ["snapkv", {"name": "h2o", "ratios": [0.2]}, {"name": "streamingllm", "budgets": [64]}],
                 "ratios": [0.1, 0.5], "tasks": ["mmlu"]})
    got = [(m.name, m.ratio, m.budget) for m in exp.method_objects()]
    assert got == [("snapkv", 0.1, None), ("snapkv", 0.5, None), ("h2o", 0.2, None),
                   ("streamingllm", 0.1, None), ("streamingllm", 0.5, None), ("streamingllm", 1.0, 64)]


def test_a_task_may_run_its_own_methods_and_a_setting_may_take_the_ratio():
    from kvbench.evaluation import label
    from kvbench.jobs.plan import plan

    exp = parse({"methods": ["snapkv", "shotkv"], "ratios": [0.1, 0.3], "limit": 2,
                 "tasks": ["mmlu", {"name": "gsm8k", "methods": [
                     {"name": "streamingllm", "settings": {"decoding_ratio": "ratio"}}, "shotkv"]}]})
    assert [label(m) for m in exp.method_objects(exp.tasks[0])] == ["snapkv@0.1", "snapkv@0.3", "shotkv@0.1",
                                                                    "shotkv@0.3"]
    own = exp.method_objects(exp.tasks[1])
    assert [label(m) for m in own] == ["streamingllm@0.1[decoding_ratio=0.1]", "streamingllm@0.3[decoding_ratio=0.3]",
                                       "shotkv@0.1", "shotkv@0.3"]
    assert [m.decoding_ratio for m in own[:2]] == [0.1, 0.3] and all(m.compresses_decoding for m in own)
    assert [label(m) for m in exp.all_method_objects()] == [
        "snapkv@0.1", "snapkv@0.3", "shotkv@0.1", "shotkv@0.3", "streamingllm@0.1[decoding_ratio=0.1]",
        "streamingllm@0.3[decoding_ratio=0.3]"]
    jobs, todo, _ = plan(exp, None)
    assert todo == 2 * 5 + 2 * 5  # each task: 2 samples x (full + its own four)
    with pytest.raises(KvbenchError, match="a setting given as 'ratio' needs ratios, not budgets"):
        parse({"methods": [{"name": "h2o", "settings": {"decoding_ratio": "ratio"}, "budgets": [64]}],
               "tasks": ["mmlu"]}).method_objects()
    with pytest.raises(KvbenchError, match="task 'gsm8k': methods is empty"):
        parse({"methods": ["snapkv"], "tasks": [{"name": "gsm8k", "methods": []}]})


def test_paper_yaml_is_the_study_s_protocol():
    exp = parse(read("paper"))
    assert {t.protocol for t in exp.tasks} == {"after-prefill"}
    by = {t.name: t for t in exp.tasks}
    assert {n: (by[n].settings.get("format"), by[n].settings.get("shots")) for n in ("mmlu", "csqa", "gsm8k",
                                                                                    "humaneval")} == {
        "mmlu": ("harness", 5), "csqa": ("harness", 4), "gsm8k": ("harness", 8), "humaneval": ("harness", 8)}
    longgen = exp.method_objects(by["longgen"])
    assert {m.name for m in longgen} == {"streamingllm", "h2o", "pyramidinfer", "shotkv"}
    assert all(m.compresses_decoding and m.decoding_keep_count(100) == round(100 * m.ratio) for m in longgen)
    assert len(longgen) == 4 * 9 and len(exp.method_objects(by["mmlu"])) == 8 * 9


@pytest.mark.parametrize("name", ["quick", "manyshot", "paper", "storage", "protocols"])
def test_shipped_configs_validate_and_dry_run_offline(name, capsys, tmp_path):
    """paper.yaml needs CUDA and the hub: its dry run validates what can be checked here."""
    assert main(["run", name, "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "configs:" in out and "task:" in out
    assert not (tmp_path / "results.sqlite").exists()
    if name == "paper":
        assert "(hub)" in out and "cuda" in out


def test_storage_methods_run_once_and_compositions_take_both_settings():
    from kvbench.evaluation import label

    exp = parse({"methods": ["snapkv", "kivi", {"name": "kivi", "settings": {"bits": 4}}, "lowrank",
                             {"name": "snapkv+kivi", "settings": {"bits": 4}}],
                 "ratios": [0.3, 0.6], "tasks": ["mmlu"]})
    assert [label(m) for m in exp.method_objects()] == [
        "snapkv@0.3", "snapkv@0.6", "kivi", "kivi[bits=4]", "lowrank@0.3", "lowrank@0.6",
        "snapkv+kivi@0.3[bits=4]", "snapkv+kivi@0.6[bits=4]"]


@pytest.mark.parametrize("methods,message", [
    ("[{name: kivi, ratios: [0.3]}]", "kivi keeps every token, so it takes no ratio"),
    ("[{name: kivi, settings: {bits: 3}}]", "2, 4 or 8 bits"),
    ("[adakv+kivi]", "not an eviction method that composes"),
    ("[snapkv+zip]", "STORAGE one of kivi, lowrank"),
])
def test_bad_storage_configs_are_one_line_and_exit_2(tmp_path, capsys, methods, message):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"methods: {methods}\nratios: [0.5]\ntasks: [mmlu]\nlimit: 1\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_cuda_device_passes_validation_where_cuda_is_available(tmp_path, monkeypatch):
    """The other side of "no CUDA device here": on a host with CUDA the same config validates (checked without
    running it: `validate` is what `kvbench run` calls before any work)."""
    from kvbench.jobs.config import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    exp = parse(read_text(tmp_path, GOOD + "device: cuda\n"))
    methods, tasks = validate(exp)
    assert exp.device == "cuda" and [t.name for t in tasks] == ["mmlu"] and len(methods) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KvbenchError, match="no CUDA device here"):
        validate(exp)


def read_text(tmp_path, text: str):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(text)
    return read(str(cfg))


def test_methods_on_the_command_line_narrow_a_task_s_own_methods_too():
    from kvbench.jobs.config import overridden

    exp = parse(overridden(read("paper"), methods=["h2o", "snapkv"]))
    by = {t.name: t for t in exp.tasks}
    assert {m.name for m in exp.method_objects(by["mmlu"])} == {"h2o", "snapkv"}
    longgen = exp.method_objects(by["longgen"])
    assert {(m.name, m.decoding_ratio is not None) for m in longgen} == {("h2o", True), ("snapkv", False)}


def test_scoring_multiple_choice_by_letter_is_part_of_its_tasks_keys():
    """A run scored by generated letter must not resume from (or mix with) rows scored by log-likelihood."""
    exp = parse({"methods": ["snapkv"], "mc": "letter", "protocol": "after-prefill", "tasks": ["mmlu", "gsm8k"]})
    assert [t.key for t in exp.tasks] == ["mmlu@after-prefill@mc=letter", "gsm8k@after-prefill"]
    assert [t.key for t in parse({"methods": ["snapkv"], "tasks": ["mmlu"]}).tasks] == ["mmlu"]
