"""Normalise any supported row schema into the LESS row, or say why not.

The LESS / open-instruct row is ``{"dataset", "id", "messages": [{"role", "content"}, ...]}``.
Accepted schemas, tried in this order:

- ``messages``: a list of ``{"role", "content"}`` (other keys inside a message are dropped);
- ``conversations`` (ShareGPT): ``{"from", "value"}`` with from = human/user, gpt/assistant, system;
- ``instruction`` + ``output`` (Alpaca; a non-empty ``input`` is appended to the instruction
  after a blank line);
- ``prompt`` + ``completion``.

A missing (or empty) ``dataset`` comes from the source (file stem or ``data_dir`` folder name); a
missing ``id`` is ``<dataset>_<sha1 of the canonical JSON of the messages, 16 hex>``, so it is
stable across runs, paths and file formats. Every other field of the original row is kept,
unchanged, in ``extra``: a JSON object string (``"{}"`` when there is none), so rows with different
extra keys still share one Arrow/Parquet schema; ``json.loads(row["extra"])`` gives them back.

Turns are checked: an optional system message first, then user and assistant alternating,
starting with user and ending with assistant, no content empty after stripping whitespace.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from selectmoe.data.rejects import RowError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

# schema name -> the keys it consumes (the rest go to ``extra``)
_SCHEMA_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
}
_CONSUMED_KEYS = {schema: frozenset({"dataset", "id", *keys}) for schema, keys in _SCHEMA_KEYS.items()}
_ROLE_SET = frozenset(ROLES)


def normalize_record(value: Any, default_dataset: str) -> dict:
    """One raw record -> ``{"dataset", "id", "messages", "extra"}``; raises ``RowError``."""
    if not isinstance(value, dict):
        raise RowError("bad_type", f"field 'row' is {_type_name(value)}, expected an object")
    schema = _detect_schema(value)
    messages = _MESSAGE_BUILDERS[schema](value)
    check_turns(messages)
    dataset = _optional_string(value, "dataset") or default_dataset
    row_id = _optional_string(value, "id") or content_id(dataset, messages)
    consumed = _CONSUMED_KEYS[schema]
    extra = "{}"
    if not value.keys() <= consumed:
        kept = {key: item for key, item in value.items() if key not in consumed}
        extra = json.dumps(kept, ensure_ascii=False, sort_keys=True, default=str)
    return {"dataset": dataset, "id": row_id, "messages": messages, "extra": extra}


def content_id(dataset: str, messages: list[dict]) -> str:
    canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return f"{dataset}_{hashlib.sha1(canonical.encode('utf-8')).hexdigest()[:16]}"


def check_turns(messages: list[dict]) -> None:
    """Optional system first, then user/assistant alternating, last assistant, nothing empty."""
    for index, message in enumerate(messages):
        content = message["content"]
        if not content or content.isspace():  # empty after strip(), without the copy strip() makes
            raise RowError("empty_content", f"field 'messages[{index}].content' is empty")
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise RowError("no_assistant_turn", f"roles {roles} have no assistant turn")
    turns = roles[1:] if roles[0] == "system" else roles
    for index, role in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            position = index + (len(roles) - len(turns))
            raise RowError(
                "bad_turn_order", f"field 'messages[{position}].role' is {role!r}, expected {expected!r}"
            )
    if turns[-1] != "assistant":
        raise RowError("bad_turn_order", f"the last turn is {turns[-1]!r}, expected 'assistant'")


# ---------------------------------------------------------------------------- schemas


def _detect_schema(value: dict) -> str:
    if "messages" in value:
        return "messages"
    if "conversations" in value:
        return "sharegpt"
    if "instruction" in value and "output" in value:
        return "alpaca"
    if "prompt" in value and "completion" in value:
        return "prompt_completion"
    keys = ", ".join(sorted(map(str, value))) or "none"
    raise RowError(
        "unknown_schema",
        f"keys [{keys}]; expected messages, conversations, instruction+output or prompt+completion",
    )


def _from_messages(value: dict) -> list[dict]:
    messages = []
    for index, item in enumerate(_list_field(value, "messages")):
        if type(item) is dict:  # the common case, checked inline; anything else gets the full checks
            role, content = item.get("role"), item.get("content")
            if type(role) is str and type(content) is str and role in _ROLE_SET:
                messages.append({"role": role, "content": content})
                continue
        messages.append(_checked_message(item, index))
    return messages


def _checked_message(item, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(item, dict):
        raise RowError("bad_type", f"field '{where}' is {_type_name(item)}, expected an object")
    role = _string_field(item, "role", where)
    if role not in ROLES:
        raise RowError("bad_role", f"field '{where}.role' is {role!r}, expected one of {list(ROLES)}")
    return {"role": role, "content": _string_field(item, "content", where)}


def _from_sharegpt(value: dict) -> list[dict]:
    items = _list_field(value, "conversations")
    messages = []
    for index, item in enumerate(items):
        where = f"conversations[{index}]"
        if not isinstance(item, dict):
            raise RowError("bad_type", f"field '{where}' is {_type_name(item)}, expected an object")
        speaker = _string_field(item, "from", where)
        if speaker not in SHAREGPT_ROLES:
            raise RowError(
                "bad_role", f"field '{where}.from' is {speaker!r}, expected one of {list(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": _string_field(item, "value", where)})
    return messages


def _from_alpaca(value: dict) -> list[dict]:
    instruction = _string_field(value, "instruction")
    extra_input = _string_field(value, "input") if value.get("input") is not None else ""
    prompt = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _string_field(value, "output")},
    ]


def _from_prompt_completion(value: dict) -> list[dict]:
    return [
        {"role": "user", "content": _string_field(value, "prompt")},
        {"role": "assistant", "content": _string_field(value, "completion")},
    ]


_MESSAGE_BUILDERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}


# ---------------------------------------------------------------------------- field checks


def _list_field(value: dict, key: str) -> list:
    items = value[key]
    if not isinstance(items, list):
        raise RowError("bad_type", f"field '{key}' is {_type_name(items)}, expected a list")
    if not items:
        raise RowError("no_assistant_turn", f"field '{key}' is an empty list")
    return items


def _string_field(value: dict, key: str, where: str = "") -> str:
    name = f"{where}.{key}" if where else key
    if key not in value:
        raise RowError("bad_type", f"field '{name}' is missing")
    item = value[key]
    if not isinstance(item, str):
        raise RowError("bad_type", f"field '{name}' is {_type_name(item)}, expected a string")
    return item


def _optional_string(value: dict, key: str) -> str | None:
    """``dataset`` / ``id``: absent, null or "" -> None; ints are accepted as ids."""
    item = value.get(key)
    if type(item) is str and item:
        return item
    if item is None or item == "":
        return None
    if isinstance(item, int) and not isinstance(item, bool):
        return str(item)
    if not isinstance(item, str):
        raise RowError("bad_type", f"field '{key}' is {_type_name(item)}, expected a string")
    return item


def _type_name(item: Any) -> str:
    return "null" if item is None else type(item).__name__
