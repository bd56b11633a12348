"""Normalise raw preference rows to prompt/chosen/rejected, then to plain text.

A normalised example is ``{"prompt", "chosen", "rejected"}`` holding either three strings
(plain) or three lists of ``{"role", "content"}`` messages (conversational: the prompt ends
with the turn to answer, chosen/rejected hold the assistant turn). ``normalize_row`` never
raises for a bad row: it returns ``Dropped(reason, detail)`` so the caller can count rows
per reason (``DROP_REASONS``). ``to_text`` renders conversational examples with the
tokenizer's chat template through TRL's ``apply_chat_template``.

Layouts (column names of the public datasets): ``explicit`` (prompt, chosen, rejected),
``implicit`` (chosen, rejected sharing a prefix), ``hh_rlhf`` (Anthropic HH transcripts),
``pku_saferlhf`` (prompt, response_0, response_1, better_/safer_response_id),
``ultrafeedback`` (UltraFeedback-binarized: prompt string, chosen/rejected conversations),
``codeultrafeedback`` (instruction + chosen/rejected, or + responses/annotations with
ratings), ``completion`` (prompt, completion: supervised rows for ``dpo.objective: sft``;
``rejected`` is None), and ``auto`` (detected per row by ``detect_layout``). See
docs/data-formats.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ama_ray.errors import ConfigError, DataError, ModelError

LAYOUTS = ("auto", "explicit", "implicit", "hh_rlhf", "pku_saferlhf", "ultrafeedback",
           "codeultrafeedback", "completion")
DROP_REASONS = ("missing_field", "empty_field", "wrong_type", "identical", "unparsable", "tied", "undesirable")
PKU_PAIR_KEYS = ("better_response_id", "safer_response_id")
# Column names a column map may point to: the fields the layouts read.
FIELDS = ("prompt", "chosen", "rejected", "response_0", "response_1", *PKU_PAIR_KEYS,
          "instruction", "responses", "annotations", "completion")

_ROLES = ("system", "user", "assistant", "tool")
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


@dataclass(frozen=True)
class Dropped:
    """Why a row was not used: ``reason`` is one of DROP_REASONS, ``detail`` names the field."""

    reason: str
    detail: str = ""


def _text(row: dict, name: str) -> str | Dropped:
    value = row.get(name)
    if value is None:
        return Dropped("missing_field", name)
    if not isinstance(value, str):
        return Dropped("wrong_type", f"{name} is {type(value).__name__}, not text")
    return value if value.strip() else Dropped("empty_field", name)


def _messages(value: object, name: str) -> list[dict] | Dropped:
    """Messages reduced to role and content (Parquet adds None-valued keys of other rows)."""
    if not isinstance(value, list):
        return Dropped("wrong_type", f"{name} is {type(value).__name__}, not a message list")
    if not value:
        return Dropped("empty_field", name)
    out = []
    for message in value:
        if not (isinstance(message, dict) and message.get("role") in _ROLES
                and isinstance(message.get("content"), str)):
            return Dropped("wrong_type", f"{name} holds a message without role/content text")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _finish(prompt, chosen, rejected) -> dict | Dropped:
    """Last checks shared by every layout: nothing empty, chosen differs from rejected."""
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, str) and not value.strip():
            return Dropped("empty_field", name)
        if isinstance(value, list) and (not value or not any(m["content"].strip() for m in value)):
            return Dropped("empty_field", name)
    if chosen == rejected:
        return Dropped("identical", "chosen == rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _completion(row: dict) -> dict | Dropped:
    """A prompt/completion row (supervised fine-tuning, `dpo.objective: sft`): the completion
    becomes `chosen` and `rejected` is None. Text, or message lists (TRL's conversational
    prompt-completion format; a text prompt with a message completion becomes one user turn).
    A row of TRL's unpaired preference format whose `label` is false is dropped (`undesirable`)."""
    if row.get("label") is False:  # TRL's unpaired preference format (KTO data): not one to imitate
        return Dropped("undesirable", "label is false")
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            return Dropped("missing_field", name)
    if isinstance(completion, str):
        if not isinstance(prompt, str):
            return Dropped("wrong_type", "prompt is a message list but completion is text")
        if not prompt.strip() or not completion.strip():
            return Dropped("empty_field", "prompt" if not prompt.strip() else "completion")
        return {"prompt": prompt, "chosen": completion, "rejected": None}
    completion = _messages(completion, "completion")
    if isinstance(completion, Dropped):
        return completion
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
    if isinstance(prompt, Dropped):
        return prompt
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not any(m["content"].strip() for m in value):
            return Dropped("empty_field", name)
    return {"prompt": prompt, "chosen": completion, "rejected": None}


def _pair(row: dict) -> tuple | Dropped:
    """chosen and rejected of a row, both text or both message lists."""
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            return Dropped("missing_field", name)
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        return chosen, rejected
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    for value in (chosen, rejected):
        if isinstance(value, Dropped):
            return value
    return chosen, rejected


def _explicit(row: dict, conversational_only: bool = False) -> dict | Dropped:
    pair = _pair(row)
    if isinstance(pair, Dropped):
        return pair
    chosen, rejected = pair
    prompt = row.get("prompt")
    if prompt is None:
        return Dropped("missing_field", "prompt")
    if isinstance(chosen, str):
        if conversational_only:
            return Dropped("wrong_type", "chosen is text, not a message list")
        return _finish(prompt, chosen, rejected) if isinstance(prompt, str) else \
            Dropped("wrong_type", "prompt is a message list but chosen/rejected are text")
    if _is_messages(prompt):
        prompt = _messages(prompt, "prompt")
        return prompt if isinstance(prompt, Dropped) else _finish(prompt, chosen, rejected)
    if not isinstance(prompt, str):
        return Dropped("wrong_type", f"prompt is {type(prompt).__name__}")
    if chosen[0]["role"] != "assistant":  # whole conversations (UltraFeedback): split them
        return _implicit({"chosen": chosen, "rejected": rejected})
    return _finish([{"role": "user", "content": prompt}], chosen, rejected)


def _implicit(row: dict) -> dict | Dropped:
    pair = _pair(row)
    if isinstance(pair, Dropped):
        return pair
    chosen, rejected = pair
    if chosen == rejected:
        return Dropped("identical", "chosen == rejected")
    if chosen[0] != rejected[0]:  # TRL's extract_prompt mis-splits when nothing is shared
        return Dropped("empty_field", "prompt (chosen and rejected share no prefix)")
    from trl.data_utils import extract_prompt  # trl takes seconds to import: only when needed

    example = extract_prompt({"chosen": chosen, "rejected": rejected})
    if not example["prompt"]:
        return Dropped("empty_field", "prompt (chosen and rejected share no prefix)")
    return _finish(example["prompt"], example["chosen"], example["rejected"])


def _hh_messages(text: str) -> list[dict] | None:
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _hh_rlhf(row: dict) -> dict | Dropped:
    transcripts = [_text(row, "chosen"), _text(row, "rejected")]
    for value in transcripts:
        if isinstance(value, Dropped):
            return value
    chosen, rejected = (_hh_messages(t) for t in transcripts)
    if chosen is None or rejected is None:
        return Dropped("unparsable", "no '\\n\\nHuman:'/'\\n\\nAssistant:' turns")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return Dropped("unparsable", "transcript does not end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        return Dropped("unparsable", "chosen and rejected differ before the last Assistant turn")
    return _finish(chosen[:-1], chosen[-1:], rejected[-1:])


def _pair_id(value: object) -> int | None:
    """0 or 1 from an int, a float or text (CSV); anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    return None


def _pku_saferlhf(row: dict, pair_key: str) -> dict | Dropped:
    fields = {name: _text(row, name) for name in ("prompt", "response_0", "response_1")}
    for value in fields.values():
        if isinstance(value, Dropped):
            return value
    if row.get(pair_key) is None:
        return Dropped("missing_field", pair_key)
    better = _pair_id(row[pair_key])
    if better is None:
        return Dropped("wrong_type", f"{pair_key} is {row[pair_key]!r}, not 0 or 1")
    return _finish(fields["prompt"], fields[f"response_{better}"], fields[f"response_{1 - better}"])


def _rating(value: object) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # "N/A" and missing ratings do not count
        return None


def _best_and_worst(row: dict) -> tuple[str, str] | Dropped:
    """Highest- and lowest-rated responses of a raw CodeUltraFeedback row (first on ties)."""
    responses, annotations = row.get("responses"), row.get("annotations")
    if not isinstance(responses, list) or not isinstance(annotations, list):
        return Dropped("wrong_type", "responses/annotations are not lists")
    ratings = {a.get("model"): _rating(a.get("rating")) for a in annotations if isinstance(a, dict)}
    rated = [(ratings[r["model"]], r["response"]) for r in responses
             if isinstance(r, dict) and ratings.get(r.get("model")) is not None
             and isinstance(r.get("response"), str)]
    if len(rated) < 2:
        return Dropped("missing_field", "fewer than two rated responses")
    best, worst = max(rated, key=lambda x: x[0]), min(rated, key=lambda x: x[0])
    if best[0] == worst[0]:
        return Dropped("tied", f"all responses rated {best[0]:g}")
    return best[1], worst[1]


def _codeultrafeedback(row: dict) -> dict | Dropped:
    instruction = _text(row, "instruction")
    if isinstance(instruction, Dropped):
        return instruction
    if row.get("chosen") is not None or row.get("rejected") is not None:
        pair = tuple(_text(row, name) for name in ("chosen", "rejected"))
    elif row.get("responses") is not None:
        pair = _best_and_worst(row)
    else:
        return Dropped("missing_field", "chosen/rejected or responses/annotations")
    if isinstance(pair, Dropped):
        return pair
    for value in pair:
        if isinstance(value, Dropped):
            return value
    return _finish([{"role": "user", "content": instruction}],
                   [{"role": "assistant", "content": pair[0]}],
                   [{"role": "assistant", "content": pair[1]}])


def detect_layout(row: dict) -> str | None:
    """The layout a raw row looks like, or None when no layout fits its columns.

    Callers that read a whole file should detect on its first row and keep that layout.
    """
    keys = {k for k, v in row.items() if v is not None}
    if {"prompt", "response_0", "response_1"} <= keys:
        return "pku_saferlhf"
    if "instruction" in keys and ({"chosen", "rejected"} <= keys or "responses" in keys):
        return "codeultrafeedback"
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys:
            return "explicit"
        chosen = row["chosen"]
        return "hh_rlhf" if isinstance(chosen, str) and _HH_TURN.search(chosen) else "implicit"
    if {"prompt", "completion"} <= keys:
        return "completion"
    return None


def _rename(row: dict, column_map: dict) -> dict:
    unknown = sorted(set(column_map) - set(FIELDS))
    if unknown:
        raise ConfigError(f"column map names unknown field(s) {unknown}",
                          where="data.tasks[].column_map", fix=f"map any of {', '.join(FIELDS)}")
    renamed = {k: v for k, v in row.items() if k not in column_map}
    renamed.update({field: row.get(column) for field, column in column_map.items()})
    return renamed


def normalize_row(row: dict, layout: str = "auto", column_map: dict | None = None,
                  pku_pair_key: str = "better_response_id") -> dict | Dropped:
    """Normalise one raw row to ``{"prompt", "chosen", "rejected"}`` or return Dropped
    (``rejected`` is None for a prompt/completion row).

    ``column_map`` maps a field (FIELDS) to the row's column, e.g. ``{"prompt": "question"}``;
    ``pku_pair_key`` picks the PKU-SafeRLHF preference (``better_response_id`` or
    ``safer_response_id``). Raises ConfigError for an unknown layout, pair key or field.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}", where="data.tasks[].layout",
                          fix=f"use one of {', '.join(LAYOUTS)}")
    if pku_pair_key not in PKU_PAIR_KEYS:
        raise ConfigError(f"unknown PKU-SafeRLHF pair key {pku_pair_key!r}",
                          where="data.tasks[].pku_pair_key", fix=f"use one of {', '.join(PKU_PAIR_KEYS)}")
    if column_map:
        row = _rename(row, column_map)
    if layout == "auto":
        layout = detect_layout(row)
        if layout is None:
            return Dropped("missing_field", f"no layout fits columns {sorted(row)}")
    if layout == "pku_saferlhf":
        return _pku_saferlhf(row, pku_pair_key)
    normalizers = {"explicit": _explicit, "implicit": _implicit, "hh_rlhf": _hh_rlhf,
                   "ultrafeedback": lambda r: _explicit(r, conversational_only=True),
                   "codeultrafeedback": _codeultrafeedback, "completion": _completion}
    return normalizers[layout](row)


def is_conversational(example: dict) -> bool:
    """True when a normalised example holds message lists rather than text."""
    return isinstance(example["chosen"], list)


def to_text(example: dict, tokenizer=None) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text of a normalised example (rejected "" when it is None).

    Plain examples come back as they are. Conversational ones are rendered with the
    tokenizer's chat template (TRL ``apply_chat_template``): the prompt with the generation
    prompt, each completion as the rendered assistant turn (end-of-turn marker included).
    Raises ModelError when a conversational example meets a tokenizer without a chat
    template, DataError when the template rejects the messages.
    """
    if not is_conversational(example):
        return example["prompt"], example["chosen"], example["rejected"] or ""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ModelError("conversational data needs a tokenizer with a chat template",
                         where="model.name",
                         fix="use a chat model, set a chat template, or supply plain-text data")
    from trl.data_utils import apply_chat_template

    single = example["rejected"] is None  # a prompt/completion example: TRL's prompt-completion format
    try:
        if single:
            rendered = apply_chat_template({"prompt": example["prompt"], "completion": example["chosen"]}, tokenizer)
            return rendered["prompt"], rendered["completion"], ""
        rendered = apply_chat_template(example, tokenizer)
    except ValueError as err:  # e.g. a prompt ending with a system turn
        raise DataError(f"chat template failed: {err}", where=f"prompt {example['prompt']!r}",
                        fix="end the prompt with a user turn") from None
    return rendered["prompt"], rendered["chosen"], rendered["rejected"]
