"""The one chat template (open-instruct / Tulu) and its tokenisation, used by stages 1, 2 and 3.

Text, as open-instruct's ``encode_with_messages_format`` builds it::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}{eos}\\n ...

with each content stripped and the final newline dropped. The whole text is tokenised in one call,
so ``input_ids`` are exactly what the tokenizer makes of the formatted string (as open-instruct
does, including the BOS its tokenizer adds). Label boundaries come from the tokenizer's character
offsets: a token belongs to an assistant turn when it starts inside that turn's content + EOS.
With ``loss_on="assistant"`` only those tokens keep their label (diff with open-instruct: the
newline after a middle assistant turn's EOS is not labelled); ``loss_on="all"`` labels every token.

Truncation keeps the first ``max_seq_length`` tokens (open-instruct's rule). A row left with no
assistant token raises ``RowError("no_assistant_tokens_after_truncation")``: readers turn it into
a reject, so no stage ever trains on or scores a row with nothing to learn from.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from selectmoe.data.rejects import RowError

IGNORE_INDEX = -100  # a label that carries no loss (prompt tokens, padding); PyTorch's default

LOSS_ON = ("assistant", "all")
ROLE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}


def format_messages(messages: list[dict], eos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """The template text and the ``[start, end)`` character span of each assistant content + EOS."""
    text, spans = message_spans(messages, eos_token)
    return text, [span for span, message in zip(spans, messages) if message["role"] == "assistant"]


def message_spans(messages: list[dict], eos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """The template text and each message's ``[start, end)`` character span: its content without the role
    header (an assistant's with its EOS)."""
    pieces, spans, position = [], [], 0
    for message in messages:
        header = ROLE_HEADERS[message["role"]]
        body = message["content"].strip()
        if message["role"] == "assistant":
            body += eos_token
        spans.append((position + len(header), position + len(header) + len(body)))
        piece = f"{header}{body}\n"
        pieces.append(piece)
        position += len(piece)
    return "".join(pieces)[:-1], spans


def encode_batch(
    messages_batch: list[list[dict]], tokenizer, *, max_seq_length: int, loss_on: str = "assistant"
) -> list[dict | RowError]:
    """Tokenise rows with the template: one dict per row, or the ``RowError`` that rejects it.

    A dict holds ``input_ids`` and ``labels`` (int32 arrays, truncated), ``n_tokens`` (kept),
    ``n_tokens_before_truncation`` and ``n_assistant_tokens`` (kept, whatever ``loss_on`` is).
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("the template needs a fast (Rust) tokenizer: label boundaries use its offsets")
    if not messages_batch:
        return []
    formatted = [format_messages(messages, tokenizer.eos_token) for messages in messages_batch]
    encoded = tokenizer([text for text, _ in formatted], return_offsets_mapping=True, add_special_tokens=True)
    return [
        _encode_one(ids, offsets, spans, max_seq_length, loss_on)
        for ids, offsets, (_, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], formatted)
    ]


def encode_messages(
    messages: list[dict], tokenizer, *, max_seq_length: int, loss_on: str = "assistant"
) -> dict:
    """``encode_batch`` for one row; raises the ``RowError`` instead of returning it."""
    (result,) = encode_batch([messages], tokenizer, max_seq_length=max_seq_length, loss_on=loss_on)
    if isinstance(result, RowError):
        raise result
    return result


def _encode_one(ids, offsets, spans, max_seq_length: int, loss_on: str) -> dict | RowError:
    input_ids = np.asarray(ids, dtype=np.int32)
    starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
    in_assistant = np.zeros(len(input_ids), dtype=bool)
    for start, end in spans:
        in_assistant |= (starts >= start) & (starts < end)
    n_before = len(input_ids)
    input_ids, in_assistant = input_ids[:max_seq_length], in_assistant[:max_seq_length]
    n_assistant = int(in_assistant.sum())
    if n_assistant == 0:
        first = int(np.argmax(starts >= spans[0][0])) if spans else -1
        return RowError(
            "no_assistant_tokens_after_truncation",
            f"{n_before} tokens, the first assistant token is token {first}, max_sequence_length {max_seq_length}",
        )
    labels = np.where(in_assistant, input_ids, IGNORE_INDEX) if loss_on == "assistant" else input_ids.copy()
    return {
        "input_ids": input_ids,
        "labels": labels.astype(np.int32),
        "n_tokens": len(input_ids),
        "n_tokens_before_truncation": n_before,
        "n_assistant_tokens": n_assistant,
    }


def encode_replies_alone(
    messages_batch: list[list[dict]], tokenizer, *, max_seq_length: int, n_assistant_tokens: list[int]
) -> list[dict]:
    """Each row's assistant turns without the prompts around them (system and user turns dropped, the
    same template), cut after the row's first ``n_assistant_tokens`` reply tokens: the same reply tokens
    its full encoding scores (up to tokenisation at turn boundaries), now unconditioned on the prompt.
    The other side of ``scoring.prompt_gain``. (Every reply token the full encoding kept sits at least as
    early here, so no row loses its reply tokens.)"""
    replies = [[m for m in messages if m["role"] == "assistant"] for messages in messages_batch]
    encoded = encode_batch(replies, tokenizer, max_seq_length=max_seq_length)
    out = []
    for result, n in zip(encoded, n_assistant_tokens):
        scored = np.flatnonzero(result["labels"] != IGNORE_INDEX)
        stop = scored[n] if len(scored) > n else len(result["input_ids"])
        out.append({"input_ids": result["input_ids"][:stop], "labels": result["labels"][:stop]})
    return out


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token one it already has (unk, else eos): no embedding resize."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str):
    """A tokenizer by hub id or folder, loaded once per process (Ray workers reuse it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)
