"""Adapters from each source dataset's own row schema to chat messages.

Every adapter takes one source row (a dict, as the hub or a jsonl line gives it) and returns a conversation
``[{"role": "system" | "user" | "assistant", "content": str}, ...]`` or raises :class:`MalformedRow` with a short,
reusable reason (the loaders count skipped rows per reason, so reasons never embed row content).

Rules every conversation obeys after adaptation (:func:`validate_conversation`):

- roles are ``system``, ``user`` or ``assistant``; a system turn may only open the conversation;
- contents are strings with non-whitespace text; an *empty system* turn is dropped (it carries no instruction),
  any other empty turn makes the row malformed;
- the first non-system turn is the user's; at least one user and one assistant turn;
- trailing user turns are dropped, because no response follows them to learn from, so every conversation ends with an
  assistant turn; multi-turn conversations are otherwise kept whole and in order.

Format-specific choices:

- ``sharegpt``: ``human``/``gpt``/``system`` map to ``user``/``assistant``/``system``; per-turn ``weight`` keys
  (OpenHermes, SlimOrca) are accepted and ignored, the loss mask comes from the chat template instead.
- ``gsm8k``: the worked solution is kept verbatim (calculator annotations ``<<a*b=c>>`` included, as in the source)
  and the ``#### 42`` line becomes a closing sentence ``The final answer is 42.``
- ``dolly`` / ``alpaca``: a non-empty ``context`` / ``input`` is appended to the instruction after a blank line;
  a missing or null one counts as empty.
"""

from __future__ import annotations

from typing import Any, Callable

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
GSM8K_FINAL_MARKER = "####"


class MalformedRow(ValueError):
    """A source row that cannot become a valid conversation; ``str(err)`` is the reason counted by the loaders."""


def _required_text(row: dict, key: str) -> str:
    if key not in row:
        raise MalformedRow(f"missing key '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise MalformedRow(f"'{key}' is not a string")
    if not value.strip():
        raise MalformedRow(f"empty '{key}'")
    return value


def _optional_text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedRow(f"'{key}' is not a string")
    return value


def _turn_list(row: Any, key: str) -> list:
    if not isinstance(row, dict):
        raise MalformedRow("row is not an object")
    if key not in row:
        raise MalformedRow(f"missing key '{key}'")
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise MalformedRow(f"'{key}' is not a non-empty list")
    return turns


def _flat_row(row: Any) -> dict:
    if not isinstance(row, dict):
        raise MalformedRow("row is not an object")
    return row


def validate_conversation(messages: list[dict]) -> list[dict]:
    """Check the rules in the module docstring; return the cleaned conversation (copies, only role and content)."""
    cleaned: list[dict] = []
    for position, turn in enumerate(messages):
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise MalformedRow(f"unknown role {role!r}" if isinstance(role, str) else "role is not a string")
        if not isinstance(content, str):
            raise MalformedRow("content is not a string")
        if role == "system":
            if position != 0:
                raise MalformedRow("system turn after the start")
            if not content.strip():
                continue
        elif not content.strip():
            raise MalformedRow(f"empty {role} turn")
        cleaned.append({"role": role, "content": content})
    while cleaned and cleaned[-1]["role"] == "user":
        cleaned.pop()
    dialogue = [turn["role"] for turn in cleaned if turn["role"] != "system"]
    if "assistant" not in dialogue:
        raise MalformedRow("no assistant turn")
    if dialogue[0] != "user":
        raise MalformedRow("first turn is not the user's")
    return cleaned


def from_messages(row: Any) -> list[dict]:
    """``{"messages": [{"role", "content"}, ...]}``: smol-magpie-ultra, ultrachat, tulu3."""
    turns = _turn_list(row, "messages")
    if not all(isinstance(turn, dict) for turn in turns):
        raise MalformedRow("a turn is not an object")
    return validate_conversation(turns)


def from_sharegpt(row: Any) -> list[dict]:
    """``{"conversations": [{"from", "value", "weight"?}, ...]}``: finetome, openhermes, slimorca."""
    turns = _turn_list(row, "conversations")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise MalformedRow("a turn is not an object")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise MalformedRow(f"unknown role {speaker!r}" if isinstance(speaker, str) else "role is not a string")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return validate_conversation(messages)


def _instruction_pair(prompt: str, response: str) -> list[dict]:
    return validate_conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def _with_extra(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def from_magicoder(row: Any) -> list[dict]:
    """``{"problem", "solution", "lang", "seed"}``: problem is the user turn, solution the assistant's."""
    row = _flat_row(row)
    return _instruction_pair(_required_text(row, "problem"), _required_text(row, "solution"))


def gsm8k_response(answer: str) -> str:
    """Keep the worked solution and restate the number after ``####`` as ``The final answer is N.``"""
    if GSM8K_FINAL_MARKER not in answer:
        raise MalformedRow("answer has no '####' final answer")
    reasoning, final = answer.rsplit(GSM8K_FINAL_MARKER, 1)
    final = final.strip()
    if not final:
        raise MalformedRow("empty final answer after '####'")
    closing = f"The final answer is {final}."
    return f"{reasoning.rstrip()}\n{closing}" if reasoning.strip() else closing


def from_gsm8k(row: Any) -> list[dict]:
    """``{"question", "answer"}`` with the final answer after ``####``."""
    row = _flat_row(row)
    question = _required_text(row, "question")
    return _instruction_pair(question, gsm8k_response(_required_text(row, "answer")))


def from_dolly(row: Any) -> list[dict]:
    """``{"instruction", "context", "response", "category"}``: context joins the instruction when present."""
    row = _flat_row(row)
    prompt = _with_extra(_required_text(row, "instruction"), _optional_text(row, "context"))
    return _instruction_pair(prompt, _required_text(row, "response"))


def from_alpaca(row: Any) -> list[dict]:
    """``{"instruction", "input", "output", "text"}``: input joins the instruction when present; text is ignored."""
    row = _flat_row(row)
    prompt = _with_extra(_required_text(row, "instruction"), _optional_text(row, "input"))
    return _instruction_pair(prompt, _required_text(row, "output"))


SOURCE_FORMATS: dict[str, Callable[[dict], list[dict]]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "magicoder": from_magicoder,
    "gsm8k": from_gsm8k,
    "dolly": from_dolly,
    "alpaca": from_alpaca,
}
