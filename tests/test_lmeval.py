"""The lm-evaluation-harness backend: lm-eval tasks on local JSON files, scored under compression, checked
against kvbench's own scoring of the same rows."""

from __future__ import annotations

import json
import subprocess
import sys

import lm_eval  # installed by scripts/setup.sh: a missing lm-eval fails here rather than skipping
import pytest
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from kvbench.errors import KvbenchError
from kvbench.lmeval import KvbenchLM, context_parts, split_whitespace

ROWS = [
    ("What is the capital of France?", ["Berlin", "Madrid", "Paris", "Rome"], 2),
    ("Which planet is known as the Red Planet?", ["Venus", "Mars", "Jupiter", "Saturn"], 1),
    ("What is 7 times 8?", ["54", "56", "63", "48"], 1),
    ("Which gas do plants take in for photosynthesis?", ["Oxygen", "Nitrogen", "Carbon dioxide", "Helium"], 2),
    ("Who wrote Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Jane Austen", "Mark Twain"], 1),
    ("What is the boiling point of water at sea level in Celsius?", ["50", "90", "100", "120"], 2),
]
BODY = ('"{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}'
        '\\nAnswer:"')


def write_tasks(folder) -> None:
    """A multiple-choice task in MMLU's format (kvbench's and lm-eval's) and a generation twin, on local JSON."""
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a, "subject": "general_knowledge"})
                            + "\n" for q, c, a in ROWS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              'description: "The following are multiple choice questions (with answers) about '
              '{{subject.replace(\'_\', \' \')}}.\\n\\n"\n'
              f"doc_to_text: {BODY}\nmetadata:\n  version: 1\n")
    (folder / "mc.yaml").write_text("task: kvb_mc\noutput_type: multiple_choice\ndoc_to_choice: '{{choices}}'\n"
                                    "doc_to_target: answer\nmetric_list:\n  - metric: acc\n" + common)
    (folder / "gen.yaml").write_text(
        "task: kvb_gen\noutput_type: generate_until\ndoc_to_target: \"{{['A', 'B', 'C', 'D'][answer]}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n" + common)


# ---------------------------------------------------------------- fast


def test_the_model_type_is_registered_with_lm_eval_beside_its_own():
    assert get_model("kvbench") is KvbenchLM
    assert get_model("dummy").__name__ == "DummyLM"  # registering ours must not hide lm-eval's models


def test_context_whitespace_moves_to_the_continuation():
    assert split_whitespace("Answer: ", "Paris") == ("Answer:", " Paris")
    assert split_whitespace("Answer:", " Paris") == ("Answer:", " Paris")


def test_paragraphs_become_shots_and_the_last_the_question():
    ctx = "Intro.\n\nQ: 1+1?\nA: 2\n\nQ: 2+2?\nA:"
    parts = context_parts(ctx, "paragraphs")
    assert [p.kind for p in parts] == ["shot", "shot", "question"]
    assert "".join(p.text for p in parts) == ctx and parts[-1].text == "Q: 2+2?\nA:"
    assert [p.kind for p in context_parts(ctx)] == ["question"]
    assert "".join(p.text for p in context_parts("a\n\nb\n\n", "paragraphs")) == "a\n\nb\n\n"


def test_lm_eval_s_default_cuda_device_falls_back_to_the_cpu():
    import torch

    from kvbench.lmeval import _device

    assert _device("cuda:0") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert _device(None) == "cpu" and _device("cpu") == "cpu"


def test_unknown_method_settings_fail_before_the_model_loads():
    with pytest.raises(KvbenchError, match="no setting"):
        KvbenchLM(pretrained="no-such-model", method="snapkv", ratio=0.3, not_a_setting=1)
    with pytest.raises(KvbenchError, match="segments"):
        KvbenchLM(pretrained="no-such-model", segments="sentences")
    with pytest.raises(KvbenchError, match="protocol 'eager': use one of strict, after-prefill, question-agnostic"):
        KvbenchLM(pretrained="no-such-model", protocol="eager")
    with pytest.raises(KvbenchError, match="question-agnostic needs segments=paragraphs"):
        KvbenchLM(pretrained="no-such-model", protocol="question-agnostic")


# ---------------------------------------------------------------- on the default model


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    write_tasks(folder)
    return folder


def kvbench_task(tasks_dir):
    """The same rows as kvbench's own MMLU task reads a user's file (0 shots: the prompt is the question)."""
    from kvbench.tasks import make_task

    return make_task("mmlu", shots=0, path=str(tasks_dir / "rows.jsonl"))


@pytest.fixture(scope="module")
def kvbench_rows(tasks_dir, default_model):
    """kvbench's own scoring of the same rows, full and snapkv, per protocol (computed when first asked)."""
    from kvbench.evaluation import evaluate
    from kvbench.methods import make_method

    model, tok = default_model
    rows: dict[str, list] = {}

    def under(protocol: str) -> list:
        if protocol not in rows:
            rows[protocol] = evaluate(model, tok, kvbench_task(tasks_dir),
                                      [make_method("snapkv", ratio=0.5, window_size=8)], progress=False,
                                      protocol=protocol)
        return rows[protocol]

    return under


def lm_eval_samples(tasks_dir, model_args: str) -> tuple[float, dict[int, list[float]]]:
    res = lm_eval.simple_evaluate(model="kvbench", model_args=model_args, tasks=["kvb_mc"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    logliks = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in res["samples"]["kvb_mc"]}
    return res["results"]["kvb_mc"]["acc,none"], logliks


@pytest.mark.real
@pytest.mark.parametrize("config,model_args", [
    ("full", "pretrained=smollm2-135m,method=full"),
    ("snapkv@0.5[window_size=8]", "pretrained=smollm2-135m,method=snapkv,ratio=0.5,window_size=8"),
    ("snapkv@0.5[window_size=8]", "pretrained=smollm2-135m,method=snapkv,ratio=0.5,window_size=8,"
                                  "protocol=after-prefill"),
])
def test_lm_eval_multiple_choice_matches_kvbench_scoring(tasks_dir, kvbench_rows, config, model_args):
    rows = kvbench_rows(model_args.split("protocol=")[1] if "protocol=" in model_args else "strict")
    mine = {int(r.sample.rsplit("/", 1)[1]): r for r in rows if r.config == config}
    assert len(mine) == len(ROWS)
    acc, logliks = lm_eval_samples(tasks_dir, model_args)
    assert set(logliks) == set(mine)
    for i, r in mine.items():  # same prompt ids, same option ids, same cache: the same log-likelihoods
        assert logliks[i] == pytest.approx(r.extra["option_loglik"], abs=2e-3)
    assert acc == pytest.approx(sum(r.score for r in mine.values()) / len(mine))


@pytest.mark.real
def test_lm_eval_command_line_generates_what_kvbench_generates(tasks_dir, default_model, tmp_path):
    from kvbench.evaluation import SampleRun
    from kvbench.methods import make_method

    model, tok = default_model
    task = kvbench_task(tasks_dir)
    cmd = [sys.executable, "-m", "kvbench.lmeval", "--model", "kvbench", "--model_args",
           "pretrained=smollm2-135m,method=streamingllm,ratio=0.5", "--tasks", "kvb_gen", "--include_path",
           str(tasks_dir), "--limit", "2", "--log_samples", "--output_path", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "exact_match" in res.stdout
    [samples] = list(tmp_path.rglob("samples_kvb_gen_*.jsonl"))
    got = {json.loads(line)["doc_id"]: json.loads(line)["resps"][0][0] for line in samples.read_text().splitlines()}
    method = make_method("streamingllm", ratio=0.5)
    for i, sample in enumerate(task.samples(2)):
        text, _ = SampleRun(model, tok, task, sample, [method], chat=False).generate(method, 4, ("\n",))
        assert got[i] == text


@pytest.mark.real
def test_perplexity_and_sampling_are_refused_with_a_clear_message():
    from lm_eval.api.instance import Instance

    lm = KvbenchLM(method="snapkv", ratio=0.3)
    with pytest.raises(KvbenchError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text",), 0)])
    with pytest.raises(KvbenchError, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, ("Hi", {"do_sample": True, "temperature": 0.7}), 0)])
