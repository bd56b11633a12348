"""Layouts of real-world preference data, round-tripped through files, drops and chat text."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ama_ray.data.formats import DROP_REASONS, Dropped, detect_layout, normalize_row, to_text
from ama_ray.data.readers import read_rows
from ama_ray.errors import ConfigError, ModelError


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith(".csv"):
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


HH_CHOSEN = "\n\nHuman: How do I bake bread?\n\nAssistant: Which kind?\n\nHuman: Rye.\n\nAssistant: Mix rye flour and water."
HH_REJECTED = "\n\nHuman: How do I bake bread?\n\nAssistant: Which kind?\n\nHuman: Rye.\n\nAssistant: Buy it."
HH_PROMPT = [user("How do I bake bread?"), bot("Which kind?"), user("Rye.")]

# (layout, file name, raw row, options, expected normalised example)
CASES = [
    ("explicit", "explicit.jsonl", {"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "id": 7}, {},
     {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}),
    ("explicit", "explicit_chat.parquet",
     {"prompt": [user("hi")], "chosen": [bot("hello")], "rejected": [bot("go away")]}, {},
     {"prompt": [user("hi")], "chosen": [bot("hello")], "rejected": [bot("go away")]}),
    ("implicit", "implicit.jsonl", {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}, {},
     {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"}),
    ("implicit", "implicit_chat.parquet",
     {"chosen": [user("sky?"), bot("blue")], "rejected": [user("sky?"), bot("green")]}, {},
     {"prompt": [user("sky?")], "chosen": [bot("blue")], "rejected": [bot("green")]}),
    ("hh_rlhf", "hh.jsonl", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {},
     {"prompt": HH_PROMPT, "chosen": [bot("Mix rye flour and water.")], "rejected": [bot("Buy it.")]}),
    ("pku_saferlhf", "pku.csv",
     {"prompt": "How to pick a lock?", "response_0": "Use a pick.", "response_1": "Call a locksmith.",
      "is_response_0_safe": "False", "is_response_1_safe": "True", "better_response_id": "0",
      "safer_response_id": "1"}, {},
     {"prompt": "How to pick a lock?", "chosen": "Use a pick.", "rejected": "Call a locksmith."}),
    ("pku_saferlhf", "pku_safer.parquet",
     {"prompt": "How to pick a lock?", "response_0": "Use a pick.", "response_1": "Call a locksmith.",
      "better_response_id": 0, "safer_response_id": 1}, {"pku_pair_key": "safer_response_id"},
     {"prompt": "How to pick a lock?", "chosen": "Call a locksmith.", "rejected": "Use a pick."}),
    ("ultrafeedback", "ultrafeedback.parquet",
     {"prompt": "Name a prime.", "prompt_id": "abc", "score_chosen": 9.0, "score_rejected": 2.0,
      "chosen": [user("Name a prime."), bot("7")], "rejected": [user("Name a prime."), bot("8")],
      "messages": [user("Name a prime."), bot("7")]}, {},
     {"prompt": [user("Name a prime.")], "chosen": [bot("7")], "rejected": [bot("8")]}),
    ("codeultrafeedback", "cuf_binarized.parquet",
     {"instruction": "Reverse a list in Python.", "preference": "readability",
      "chosen": "xs[::-1]", "rejected": "loop", "rating_chosen": 5, "rating_rejected": 1,
      "model_chosen": "gpt-4", "model_rejected": "wizardlm-7b"}, {},
     {"prompt": [user("Reverse a list in Python.")], "chosen": [bot("xs[::-1]")], "rejected": [bot("loop")]}),
    ("codeultrafeedback", "cuf_raw.jsonl",
     {"instruction": "Sort a list.", "models": ["a", "b", "c", "d"],
      "responses": [{"model": "a", "response": "sorted(xs)"}, {"model": "b", "response": "bogosort"},
                    {"model": "c", "response": "xs.sort()"}, {"model": "d", "response": "no idea"}],
      "annotations": [{"model": "a", "rating": "5", "rationale": "."}, {"model": "b", "rating": "2", "rationale": "."},
                      {"model": "c", "rating": "5", "rationale": "."}, {"model": "d", "rating": "N/A", "rationale": "."}]},
     {}, {"prompt": [user("Sort a list.")], "chosen": [bot("sorted(xs)")], "rejected": [bot("bogosort")]}),
    ("explicit", "column_map.csv", {"question": "capital of France?", "good": "Paris", "bad": "Lyon"},
     {"column_map": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
     {"prompt": "capital of France?", "chosen": "Paris", "rejected": "Lyon"}),
]


@pytest.mark.parametrize("layout, name, raw, options, expected", CASES, ids=[c[1] for c in CASES])
def test_layout_round_trips_through_a_file(tmp_path, layout, name, raw, options, expected):
    path = write(tmp_path, name, [raw, raw])
    rows = list(read_rows(path))
    assert len(rows) == 2
    for _, row in rows:
        assert normalize_row(row, layout, **options) == expected
        assert normalize_row(row, "auto", **options) == expected  # auto detects the same


def test_detect_layout():
    assert detect_layout({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}) == "hh_rlhf"
    assert detect_layout({"chosen": "a b", "rejected": "a c"}) == "implicit"
    assert detect_layout({"prompt": "p", "chosen": "a", "rejected": "b"}) == "explicit"
    assert detect_layout({"prompt": "p", "response_0": "a", "response_1": "b"}) == "pku_saferlhf"
    assert detect_layout({"instruction": "i", "chosen": "a", "rejected": "b"}) == "codeultrafeedback"
    assert detect_layout({"text": "t"}) is None


@pytest.mark.parametrize(
    "layout, row, reason, detail",
    [
        ("explicit", {"prompt": "p", "chosen": "c"}, "missing_field", "rejected"),
        ("explicit", {"prompt": None, "chosen": "c", "rejected": "r"}, "missing_field", "prompt"),
        ("auto", {"text": "t"}, "missing_field", "no layout fits"),
        ("explicit", {"prompt": "p", "chosen": "  ", "rejected": "r"}, "empty_field", "chosen"),
        ("explicit", {"prompt": "", "chosen": "c", "rejected": "r"}, "empty_field", "prompt"),
        ("explicit", {"prompt": "p", "chosen": [bot("")], "rejected": [bot("r")]}, "empty_field", "chosen"),
        ("implicit", {"chosen": "yes", "rejected": "no"}, "empty_field", "share no prefix"),
        ("explicit", {"prompt": "p", "chosen": 4, "rejected": "r"}, "wrong_type", "chosen is int"),
        ("explicit", {"prompt": "p", "chosen": [{"content": "x"}], "rejected": [bot("r")]}, "wrong_type", "role"),
        ("explicit", {"prompt": [user("p")], "chosen": "c", "rejected": "r"}, "wrong_type", "prompt"),
        ("ultrafeedback", {"prompt": "p", "chosen": "c", "rejected": "r"}, "wrong_type", "chosen is text"),
        ("pku_saferlhf", {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 2},
         "wrong_type", "better_response_id"),
        ("pku_saferlhf", {"prompt": "p", "response_0": "a", "response_1": "b"}, "missing_field", "better_response_id"),
        ("explicit", {"prompt": "p", "chosen": "same", "rejected": "same"}, "identical", ""),
        ("implicit", {"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("a")]}, "identical", ""),
        ("pku_saferlhf", {"prompt": "p", "response_0": "a", "response_1": "a", "better_response_id": 1},
         "identical", ""),
        ("hh_rlhf", {"chosen": "no markers here", "rejected": "none"}, "unparsable", "turns"),
        ("hh_rlhf", {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: c"},
         "unparsable", "differ before"),
        ("hh_rlhf", {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": HH_REJECTED},
         "unparsable", "does not end"),
        ("hh_rlhf", {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:"},
         "empty_field", "rejected"),
        ("codeultrafeedback",
         {"instruction": "i", "responses": [{"model": "a", "response": "x"}, {"model": "b", "response": "y"}],
          "annotations": [{"model": "a", "rating": "3"}, {"model": "b", "rating": "3"}]}, "tied", "rated 3"),
        ("codeultrafeedback", {"instruction": "i"}, "missing_field", "responses"),
    ],
)
def test_unusable_rows_are_dropped_with_a_reason(layout, row, reason, detail):
    dropped = normalize_row(row, layout)
    assert isinstance(dropped, Dropped) and dropped.reason == reason, dropped
    assert reason in DROP_REASONS and detail in dropped.detail


def test_bad_settings_are_config_errors():
    row = {"prompt": "p", "chosen": "c", "rejected": "r"}
    with pytest.raises(ConfigError, match=r"data\.tasks\[\]\.layout.*'sharegpt'"):
        normalize_row(row, "sharegpt")
    with pytest.raises(ConfigError, match=r"data\.tasks\[\]\.pku_pair_key"):
        normalize_row(row, "pku_saferlhf", pku_pair_key="helpful_id")
    with pytest.raises(ConfigError, match=r"data\.tasks\[\]\.column_map.*answer"):
        normalize_row(row, "explicit", column_map={"answer": "chosen"})


# ChatML, written out by hand so the expected strings below are independent of TRL.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_tokenizer(template=CHATML):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, chat_template=template, eos_token="<|im_end|>",
                                   unk_token="[UNK]")


@pytest.mark.timeout(120)  # the first import of trl takes seconds
def test_to_text_renders_conversations_with_the_chat_template():
    example = normalize_row({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "hh_rlhf")
    prompt, chosen, rejected = to_text(example, chat_tokenizer())
    assert prompt == (
        "<|im_start|>user\nHow do I bake bread?<|im_end|>\n"
        "<|im_start|>assistant\nWhich kind?<|im_end|>\n"
        "<|im_start|>user\nRye.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chosen == "Mix rye flour and water.<|im_end|>\n"
    assert rejected == "Buy it.<|im_end|>\n"


def test_to_text_passes_plain_text_through_and_needs_a_template_for_chat():
    assert to_text({"prompt": "p", "chosen": " c", "rejected": " r"}) == ("p", " c", " r")
    chat = {"prompt": [user("hi")], "chosen": [bot("a")], "rejected": [bot("b")]}
    with pytest.raises(ModelError, match="chat template"):
        to_text(chat)
    with pytest.raises(ModelError, match="chat template"):
        to_text(chat, chat_tokenizer(template=None))


def test_prompt_completion_rows_for_sft():
    from ama_ray.data.formats import Dropped, detect_layout, normalize_row, to_text

    row = {"prompt": "What is 2+3?", "completion": " 5"}
    assert detect_layout(row) == "completion"
    norm = normalize_row(row)
    assert norm == {"prompt": "What is 2+3?", "chosen": " 5", "rejected": None}
    assert to_text(norm) == ("What is 2+3?", " 5", "")
    assert normalize_row({"prompt": "q", "completion": "  "}) == Dropped("empty_field", "completion")
    assert normalize_row({"question": "q", "answer": "a"}, column_map={"prompt": "question", "completion": "answer"})["chosen"] == "a"
    chat = normalize_row({"prompt": "What is 2+3?", "completion": [{"role": "assistant", "content": "5"}]})
    assert chat["prompt"] == [{"role": "user", "content": "What is 2+3?"}] and chat["rejected"] is None
    # TRL's unpaired preference format: an undesirable completion is not one to imitate.
    assert normalize_row({"prompt": "q", "completion": "a", "label": False}) == Dropped("undesirable", "label is false")
    assert normalize_row({"prompt": "q", "completion": "a", "label": True})["chosen"] == "a"
    # Preference rows keep their layouts: a `completion` column does not turn a pair into SFT.
    assert detect_layout({"prompt": "q", "chosen": "a", "rejected": "b", "completion": "a"}) == "explicit"


def test_prompt_completion_conversations_render_through_the_chat_template(tmp_path):
    from ama_ray.data.formats import normalize_row, to_text
    from ama_ray.models.loading import load_tokenizer
    from ama_ray.models.tiny import build_tiny

    tok = load_tokenizer(str(build_tiny(tmp_path / "tiny", ["What is 2+3? 5"] * 20, hidden_size=16, num_heads=2,
                                        intermediate_size=32)))
    messages = [{"role": "user", "content": "What is 2+3?"}]
    norm = normalize_row({"prompt": messages, "completion": [{"role": "assistant", "content": "5"}]})
    prompt, completion, rejected = to_text(norm, tok)
    whole = tok.apply_chat_template(messages + [{"role": "assistant", "content": "5"}], tokenize=False)
    assert prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert whole.startswith(prompt) and prompt + completion == whole and rejected == ""
