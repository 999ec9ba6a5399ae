"""The one chat template: text, labels, truncation, pad token."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import SHARED_TRAIN
from transformers import AutoConfig, AutoTokenizer

from selectmoe.data.rejects import RowError
from selectmoe.data.template import (
    IGNORE_INDEX,
    encode_batch,
    encode_messages,
    encode_replies_alone,
    ensure_pad_token,
    format_messages,
    load_tokenizer,
    message_spans,
)
from selectmoe.demo.run import TOKENIZER_VOCAB, demo_lm_rows
from selectmoe.demo.tiny import build_tiny_llama, build_tiny_olmoe

SHARED_OASST = str(SHARED_TRAIN / "oasst1.jsonl")

SINGLE = [
    {"role": "user", "content": "What is 2 + 3?\nLet's think step by step."},
    {"role": "assistant", "content": "2 + 3 = 5. So the answer is 5."},
]
MULTI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "  Hi! Name a fruit.  "},
    {"role": "assistant", "content": "An apple.\n"},
    {"role": "user", "content": "And a colour?"},
    {"role": "assistant", "content": "Blue, like   the sky."},
]


@pytest.fixture(scope="module")
def demo_tokenizer_dir(tmp_path_factory):
    """The demo's tokenizer (a byte-level BPE trained on its LM rows), saved as the demo models save it."""
    out = tmp_path_factory.mktemp("demo_tokenizer")
    _, trained = demo_lm_rows(out / "lm", seed=0)
    trained.save_pretrained(str(out / "tokenizer"))
    return str(out / "tokenizer")


@pytest.fixture(scope="module", params=["32k", "demo"])
def tokenizer(request, tokenizer_dir, demo_tokenizer_dir):
    """Every template test runs with the tests' 32k tokenizer and with the demo's trained one."""
    return load_tokenizer(tokenizer_dir if request.param == "32k" else demo_tokenizer_dir)


def _real_multi_turn(limit: int = 20) -> list[list[dict]]:
    with open(SHARED_OASST, encoding="utf-8") as fh:
        rows = (json.loads(line)["messages"] for line in fh)
        return list(itertools.islice((m for m in rows if len(m) >= 4), limit))


def _labelled_runs(labels: np.ndarray) -> list[tuple[int, int]]:
    runs, start = [], None
    for index, label in enumerate([*labels.tolist(), IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = index
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, index))
            start = None
    return runs


def test_text_is_open_instruct_tulu_format():
    text, spans = format_messages(MULTI, "</s>")
    assert text == (
        "<|system|>\nYou are a helpful assistant.\n"
        "<|user|>\nHi! Name a fruit.\n"
        "<|assistant|>\nAn apple.</s>\n"
        "<|user|>\nAnd a colour?\n"
        "<|assistant|>\nBlue, like   the sky.</s>"
    )
    assert [text[start:end] for start, end in spans] == ["An apple.</s>", "Blue, like   the sky.</s>"]
    same_text, every_span = message_spans(MULTI, "</s>")  # every message's content, headers left out
    assert same_text == text
    assert [text[start:end] for start, end in every_span] == [
        "You are a helpful assistant.", "Hi! Name a fruit.", "An apple.</s>", "And a colour?", "Blue, like   the sky.</s>"
    ]  # fmt: skip


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_ids_decode_to_the_formatted_text(tokenizer, messages):
    encoded = encode_messages(messages, tokenizer, max_seq_length=4096)
    text, _ = format_messages(messages, tokenizer.eos_token)
    assert tokenizer.decode(encoded["input_ids"].tolist()) == text
    assert encoded["input_ids"].tolist() == tokenizer(text)["input_ids"]  # one tokenisation of the whole text


def test_real_rows_decode_to_the_formatted_text(tokenizer):
    rows = _real_multi_turn()
    for messages, encoded in zip(rows, encode_batch(rows, tokenizer, max_seq_length=100_000)):
        assert tokenizer.decode(encoded["input_ids"].tolist()) == format_messages(messages, "</s>")[0]


@pytest.mark.parametrize("messages", [SINGLE, MULTI, *_real_multi_turn(5)])
def test_assistant_labels_are_exactly_the_assistant_turns_and_eos(tokenizer, messages):
    encoded = encode_messages(messages, tokenizer, max_seq_length=100_000)
    labels, ids = encoded["labels"], encoded["input_ids"]
    runs = _labelled_runs(labels)
    expected = [m["content"].strip() + tokenizer.eos_token for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(labels[start:end].tolist()) for start, end in runs] == expected
    assert all(labels[end - 1] == tokenizer.eos_token_id for _, end in runs)
    mask = labels != IGNORE_INDEX
    assert np.array_equal(labels[mask], ids[mask])
    assert encoded["n_assistant_tokens"] == int(mask.sum())
    assert encoded["n_tokens"] == len(ids) == encoded["n_tokens_before_truncation"]
    assert ids.dtype == np.int32 and labels.dtype == np.int32


def test_demo_tokenizer_encodes_any_text_and_matches_the_tiny_models_ids(demo_tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(demo_tokenizer_dir)
    odd = (
        "zqxj #$%&@ ÿ€ 日本語 \x07 🙂 <|user|>"  # nothing of this is in the generated rows it was trained on
    )
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd
    assert tokenizer.unk_token_id not in tokenizer(odd)["input_ids"]
    for build in (build_tiny_olmoe, build_tiny_llama):
        config = AutoConfig.from_pretrained(build(tmp_path / build.__name__, tokenizer=tokenizer))
        assert config.vocab_size == len(tokenizer) == TOKENIZER_VOCAB
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
        assert ensure_pad_token(tokenizer).pad_token_id == config.pad_token_id


def test_loss_on_all_labels_every_token(tokenizer):
    assistant_only = encode_messages(MULTI, tokenizer, max_seq_length=4096)
    everything = encode_messages(MULTI, tokenizer, max_seq_length=4096, loss_on="all")
    assert np.array_equal(everything["labels"], everything["input_ids"])
    assert np.array_equal(everything["input_ids"], assistant_only["input_ids"])
    assert everything["n_assistant_tokens"] == assistant_only["n_assistant_tokens"]


def test_truncation_keeps_the_start(tokenizer):
    full = encode_messages(MULTI, tokenizer, max_seq_length=4096)
    cut = len(full["input_ids"]) - 3  # inside the last assistant turn
    truncated = encode_messages(MULTI, tokenizer, max_seq_length=cut)
    assert np.array_equal(truncated["input_ids"], full["input_ids"][:cut])
    assert np.array_equal(truncated["labels"], full["labels"][:cut])
    assert truncated["n_tokens"] == cut
    assert truncated["n_tokens_before_truncation"] == len(full["input_ids"])
    assert 0 < truncated["n_assistant_tokens"] < full["n_assistant_tokens"]


def test_truncation_that_leaves_no_assistant_token_rejects_the_row(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Short."}]
    results = encode_batch([SINGLE, long_prompt, MULTI], tokenizer, max_seq_length=64)
    assert isinstance(results[0], dict) and isinstance(results[2], dict)
    assert isinstance(results[1], RowError)
    assert results[1].reason == "no_assistant_tokens_after_truncation"
    with pytest.raises(RowError, match="no_assistant_tokens_after_truncation"):
        encode_messages(long_prompt, tokenizer, max_seq_length=64)


def test_unknown_loss_on_is_refused(tokenizer):
    with pytest.raises(ValueError, match="loss_on"):
        encode_messages(SINGLE, tokenizer, max_seq_length=64, loss_on="prompt")


def test_ensure_pad_token_uses_unk_then_eos_without_new_tokens(tokenizer_dir):
    fresh = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = len(fresh)
    assert fresh.pad_token is None
    assert ensure_pad_token(fresh).pad_token == "<unk>"
    assert len(fresh) == size

    no_unk = AutoTokenizer.from_pretrained(tokenizer_dir)
    no_unk.unk_token = None
    assert ensure_pad_token(no_unk).pad_token == "</s>"
    assert len(no_unk) == size


def test_replies_alone_score_the_same_reply_tokens_without_the_prompt(tokenizer):
    rows = [SINGLE, MULTI, *_real_multi_turn()]
    full = encode_batch(rows, tokenizer, max_seq_length=2048)
    alone = encode_replies_alone(
        rows, tokenizer, max_seq_length=2048, n_assistant_tokens=[e["n_assistant_tokens"] for e in full]
    )
    for prompted, reply in zip(full, alone):
        scored = prompted["labels"][prompted["labels"] != IGNORE_INDEX]
        np.testing.assert_array_equal(reply["labels"][reply["labels"] != IGNORE_INDEX], scored)
        text = tokenizer.decode(reply["input_ids"])
        assert "<|user|>" not in text and "<|system|>" not in text
        assert len(reply["input_ids"]) < len(prompted["input_ids"])


def test_replies_alone_stop_where_truncation_cut_the_prompted_reply(tokenizer):
    (whole,) = encode_batch([MULTI], tokenizer, max_seq_length=2048)
    cut = _labelled_runs(whole["labels"])[-1][0] + 2  # two tokens into the last reply
    (prompted,) = encode_batch([MULTI], tokenizer, max_seq_length=cut)
    (reply,) = encode_replies_alone(
        [MULTI], tokenizer, max_seq_length=cut, n_assistant_tokens=[prompted["n_assistant_tokens"]]
    )
    assert prompted["n_assistant_tokens"] < whole["n_assistant_tokens"]
    kept = reply["labels"][reply["labels"] != IGNORE_INDEX]
    np.testing.assert_array_equal(kept, prompted["labels"][prompted["labels"] != IGNORE_INDEX])
    assert reply["labels"][-1] != IGNORE_INDEX  # nothing after the last kept reply token
