"""Conversations -> token ids with labels on assistant tokens only, for any chat template.

Assistant spans are found in characters by rendering growing prefixes of the conversation (a chat template renders
`messages[:k]` + generation prompt as a prefix of `messages[:k+1]`), then mapped to tokens with the fast tokenizer's
offsets. This works for templates without `{% generation %}` markers, such as LFM2.5's own, and the result is a
pre-tokenized dataset that TRL trains on as is (it keeps our labels, truncation and packing apply on top).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The model's chat template does not render conversations prefix by prefix, so spans cannot be found."""


@dataclass
class TokenizedSet:
    examples: list[dict]
    """{"input_ids": [...], "labels": [...]} with labels -100 outside assistant turns."""
    dropped: int
    """Conversations whose assistant tokens were all cut off by max_length."""

    @property
    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)

    @property
    def num_assistant_tokens(self) -> int:
        return sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in self.examples)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn (with its end tag)."""
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = render(messages[: i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise TemplateError(
                "the chat template does not render conversations prefix by prefix (turn "
                f"{i} changes earlier text); assistant-only loss needs a prefix-stable template"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict:
    text, spans = assistant_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"][:max_length]
    offsets = encoded["offset_mapping"][:max_length]
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(input_ids, offsets)
    ]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_conversations(tokenizer, conversations: list[list[dict]], max_length: int) -> TokenizedSet:
    examples, dropped = [], 0
    for messages in conversations:
        example = tokenize_conversation(tokenizer, messages, max_length)
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped += 1
            continue
        examples.append(example)
    return TokenizedSet(examples, dropped)
