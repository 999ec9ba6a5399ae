"""Planted low-quality replies of named kinds, for the demo corpus and the selection-quality benchmark.

``plant_defects`` spoils the final assistant reply of a ``rate`` share of rows in place, the kinds in
equal numbers, and returns one label per row (``{"id", "dataset", "quality", "defect"}``). Kinds:
``garbled`` (characters replaced by symbols), ``shuffled`` (words, or the letters of a short reply,
shuffled), ``swapped`` (another row's reply), ``wrong_answer`` (a fluent reply with a wrong final
answer; only rows for which the caller can make one), ``truncated`` (cut off mid-reply),
``empty_ish`` (".", "N/A", ...), ``spam`` (a promotional phrase repeated). ``HELD_OUT_KINDS`` are
kept out of the demo: ``looped`` (the reply's opening words repeated, a generation loop) and ``echo``
(the user's request restated instead of answered), out of every weight choice until the reply-redundancy
term's weight was chosen on them; and, designed later (committed before the reply-redundancy score term
was written or measured, to judge it): ``restated`` (the request restated, then only the reply's first
sentence), ``doubled`` (the whole reply twice, a generation that started over) and ``canned`` (a fluent
refusal or generic filler that answers nothing); and, designed later again from junk that cleaning work on public
instruction data documented, blind to every score: ``boilerplate`` (the reply buried between an AI-assistant
disclaimer and a generic closing) and ``scraped`` (the reply with the chat web page's markup or button text left
in); and, designed later again, blind to every score, from the "merged instructions" that the Alpaca-cleaned
project (gururise/AlpacaDataCleaned) found in Stanford Alpaca's outputs and removed: ``merged`` (the reply run
on into further numbered "Instruction / Input / Output" tasks of the self-instruct prompt it was generated
from); and, designed later again, blind to every score, from the answers that "reference other answers" ("as
mentioned", "stack exchange", ...) which LIMA removed from its Stack Exchange data: ``cited`` (the reply with a
paragraph citing another answer of the thread, absent here, and quoting it: another row's text). A spoiled row
is still a valid row: the defects are of quality, not of format, so only a quality score can find them.
"""

from __future__ import annotations

import html
import random
import re
from collections.abc import Callable, Sequence

from selectmoe.demo.synthetic_facts import (
    BOILERPLATE_CAVEATS,
    BOILERPLATE_CLOSINGS,
    BOILERPLATE_LEADS,
    BOILERPLATE_OPENINGS,
    CANNED_REPLIES,
    CHAT_PAGE_DIV_CLASSES,
    EMPTYISH_RESPONSES,
    MERGED_TASKS,
    SPAM_PHRASES,
)

DEFECT_KINDS = ("garbled", "shuffled", "swapped", "wrong_answer", "truncated", "empty_ish", "spam")
HELD_OUT_KINDS = (
    "looped",
    "echo",
    "restated",
    "doubled",
    "canned",
    "boilerplate",
    "scraped",
    "merged",
    "cited",
)
_GARBLE_CHARS = "#$%&@!?*~^+=<>|"
# how a ``cited`` reply points at the other answer it quotes (or at its author, "@" a word of the corpus)
CITED_ANSWERS = (
    "the answer above",
    "the accepted answer",
    "the other answer",
    "the top answer",
    "an earlier answer",
    "the answer below",
    "the Stack Exchange answer",
)
CITE_VERBS = ("says", "said", "mentions", "points out", "notes", "wrote")
CITE_LEADS = ("As", "Like", "Also, as", "EDIT: as")

# wrong_reply(row index, reply) -> a reply with a wrong answer, or None where the row has none to spoil
WrongReply = Callable[[int, str], "str | None"]


def plant_defects(
    rng: random.Random,
    rows: list[dict],
    rate: float,
    kinds: Sequence[str] = DEFECT_KINDS,
    wrong_reply: WrongReply | None = None,
) -> list[dict]:
    """Spoil the final reply of ``rate`` of the rows in place; returns one label per row."""
    unknown = set(kinds) - set(DEFECT_KINDS + HELD_OUT_KINDS)
    if unknown:
        raise ValueError(f"unknown defect kinds {sorted(unknown)}; known: {DEFECT_KINDS + HELD_OUT_KINDS}")
    if "wrong_answer" in kinds and wrong_reply is None:
        raise ValueError("defect kind 'wrong_answer' needs a wrong_reply function")
    originals = [row["messages"][-1]["content"] for row in rows]
    wrong = [wrong_reply(i, reply) if wrong_reply else None for i, reply in enumerate(originals)]
    defect_of = _choose_defects(rng, originals, wrong, round(rate * len(rows)), kinds)
    labels = []
    for index, row in enumerate(rows):
        kind = defect_of.get(index)
        if kind is not None:
            donor = _donor_reply(rng, originals, index)
            row["messages"][-1] = {
                "role": "assistant",
                "content": spoil(kind, originals[index], rng, donor, wrong[index], request_of(row)),
            }
        labels.append(
            {
                "id": row["id"],
                "dataset": row["dataset"],
                "quality": "clean" if kind is None else "defect",
                "defect": kind,
            }
        )
    return labels


def spoil(
    kind: str, reply: str, rng: random.Random, donor: str, wrong: str | None = None, request: str = ""
) -> str:
    """``reply`` spoiled by ``kind``; ``donor`` is another row's reply, ``wrong`` a wrong-answer reply,
    ``request`` the user message the reply answers."""
    if kind == "garbled":
        return _garble(reply, rng)
    if kind == "shuffled":
        return _shuffle(reply, rng)
    if kind == "swapped":
        return donor
    if kind == "wrong_answer":
        return wrong
    if kind == "truncated":
        return _truncate(reply, rng)
    if kind == "empty_ish":
        return rng.choice(EMPTYISH_RESPONSES)
    if kind == "looped":
        return _loop(reply, rng)
    if kind == "echo":
        return request
    if kind == "restated":
        return f'You asked: "{request}" {_first_sentence(reply)}'
    if kind == "doubled":
        return f"{reply}\n\n{reply}"
    if kind == "canned":
        return rng.choice(CANNED_REPLIES)
    if kind == "boilerplate":
        return _bury_in_boilerplate(reply, rng)
    if kind == "scraped":
        return _scrape(reply, rng)
    if kind == "merged":
        return _merge_tasks(reply, rng)
    if kind == "cited":
        return _cite_other_answer(reply, rng, donor, request)
    return " ".join([rng.choice(SPAM_PHRASES)] * rng.randint(4, 12))


def _choose_defects(
    rng: random.Random, replies: list[str], wrong: list[str | None], n_defects: int, kinds: Sequence[str]
) -> dict[int, str]:
    """row index -> defect kind, the kinds in equal numbers, each only where it can apply: ``truncated``
    where there is something to cut (a one-word answer such as "C" cannot be visibly truncated; it picks
    first), ``wrong_answer`` where the caller made a wrong reply."""
    counts = {kind: n_defects // len(kinds) for kind in kinds}
    for kind in kinds[: n_defects % len(kinds)]:
        counts[kind] += 1
    chosen: dict[int, str] = {}
    for kind in sorted(kinds, key=lambda kind: kind != "truncated"):
        free = [i for i, reply in enumerate(replies) if i not in chosen and applies(kind, reply, wrong[i])]
        for index in rng.sample(free, min(counts[kind], len(free))):
            chosen[index] = kind
    return chosen


def applies(kind: str, reply: str, wrong: str | None) -> bool:
    if kind == "truncated":
        return " " in reply
    if kind == "wrong_answer":
        return wrong is not None and wrong != reply
    if kind in ("boilerplate", "scraped", "merged", "cited"):
        # a blank reply has no answer to bury, page to scrape, end to run on or to cite beside
        return bool(reply.strip())
    return True


def request_of(row: dict) -> str:
    """The last user message before the final reply."""
    return next((m["content"] for m in reversed(row["messages"][:-1]) if m["role"] == "user"), "")


def _donor_reply(rng: random.Random, originals: list[str], index: int) -> str:
    while True:
        donor = originals[rng.randrange(len(originals))]
        if donor != originals[index]:
            return donor


def _garble(reply: str, rng: random.Random) -> str:
    chars = [rng.choice(_GARBLE_CHARS) if not ch.isspace() and rng.random() < 0.4 else ch for ch in reply]
    if "".join(chars) == reply:  # a very short reply the dice spared
        chars[0] = rng.choice(_GARBLE_CHARS)
    return "".join(chars)


def _shuffle(reply: str, rng: random.Random) -> str:
    words = reply.split()
    pieces, joiner = (words, " ") if len(set(words)) >= 3 else (list(reply), "")
    shuffled = list(pieces)
    for _ in range(10):
        rng.shuffle(shuffled)
        if shuffled != pieces:
            return joiner.join(shuffled)
    return joiner.join(reversed(pieces)) if pieces[::-1] != pieces else f"{reply} {reply}"


def _loop(reply: str, rng: random.Random) -> str:
    """The reply's first few words repeated to about the reply's length (at least three times)."""
    words = reply.split()
    head = " ".join(words[: rng.randint(3, 8)]) if len(words) > 3 else reply
    return " ".join([head] * max(3, len(reply) // max(1, len(head) + 1)))


def _first_sentence(reply: str) -> str:
    """The reply up to the end of its first sentence (or line); all of it when it has one only."""
    match = re.search(r"[.!?](\s|$)|\n", reply)
    return reply[: match.end()].strip() if match else reply


def _bury_in_boilerplate(reply: str, rng: random.Random) -> str:
    """The reply between an AI-assistant disclaimer with a lead-in and (sometimes a caveat and) a generic
    closing: the ChatGPT-distilled replies that the ShareGPT_Vicuna_unfiltered and WizardLM "unfiltered"
    cleaning scripts removed by these phrases ("As an AI language model", "It is important to note", ...)."""
    preamble = f"{rng.choice(BOILERPLATE_OPENINGS)} {rng.choice(BOILERPLATE_LEADS)}"
    closing = rng.choice(BOILERPLATE_CLOSINGS)
    if rng.random() < 0.5:
        closing = f"{rng.choice(BOILERPLATE_CAVEATS)} {closing}"
    return f"{preamble}\n\n{reply.strip()}\n\n{closing}"


def _scrape(reply: str, rng: random.Random) -> str:
    """The reply as scraped from the ChatGPT web page, the junk FastChat's ``clean_sharegpt.py`` cleaned out
    of ShareGPT: either the page's HTML (``_chat_page_html``), or its text with the page's leftovers: the
    "2 / 2" regenerate counter glued to the start, "Copy code" after a code block's language, sometimes a
    word-count extension's "Copy<n> chars / <n> words" at the end."""
    parts = reply.strip().split("```")  # the odd parts are code blocks: a language line, then the code
    if rng.random() < 0.5:
        return _chat_page_html(parts, rng)
    for i in range(1, len(parts), 2):
        lang, _, code = parts[i].partition("\n")
        parts[i] = f"\n{lang}Copy code{code}"
    shown = rng.randint(1, 3)
    text = f"{shown} / {rng.randint(shown, 3)}" + "```".join(parts)
    if rng.random() < 0.5:
        text += f"Copy{len(reply)} chars / {len(reply.split())} words"
    return text


def _chat_page_html(parts: list[str], rng: random.Random) -> str:
    """The reply's ``parts`` (text, code, text, ...) as the page's HTML: a ``<div class="markdown prose ...">``
    of ``<p>`` lines, each code block in a ``<pre>`` under its language and "Copy code" button."""
    body = []
    for i, part in enumerate(parts):
        if i % 2:
            lang, _, code = part.partition("\n")
            code = html.escape(code, quote=False)
            body.append(f"<pre><span>{lang}</span><button>Copy code</button><code>{code}</code></pre>")
        else:
            lines = (html.escape(line.strip(), quote=False) for line in part.splitlines())
            body += [f"<p>{line}</p>" for line in lines if line]
    return f'<div class="{rng.choice(CHAT_PAGE_DIV_CLASSES)}">{"".join(body)}</div>'


def _merge_tasks(reply: str, rng: random.Random) -> str:
    """The reply run on into one to three further tasks of the self-instruct prompt it was generated from,
    each after a "###" (or "##") line as "N. Instruction: ... / N. Input: ... / N. Output: ...", numbered on
    from 2 to at most 19: the "merged instructions" that Alpaca-cleaned found in Stanford Alpaca's outputs
    (its ``tools/tool_mergedInstructions.py`` looks for "N. Instruction:") and removed."""
    tasks = rng.sample(MERGED_TASKS, rng.randint(1, 3))
    blocks = [
        f"{n}. Instruction: {instruction}\n{n}. Input:\n{task_input or '<noinput>'}\n{n}. Output:\n{output}"
        for n, (instruction, task_input, output) in enumerate(tasks, rng.randint(2, 20 - len(tasks)))
    ]
    separator = f"\n{rng.choice(('###', '##'))}\n"
    return reply.rstrip() + separator + separator.join(blocks)


def _cite_other_answer(reply: str, rng: random.Random, donor: str, request: str) -> str:
    """The reply with a paragraph before or after it that cites another answer of its thread and quotes it (as
    'As the accepted answer says, "..."' or "@user wrote:\n> ..."): the Stack Exchange answers that "reference
    other answers" ("as mentioned", "stack exchange", ...), which LIMA removed as not self-contained. The thread
    is not here, so the quote is a few sentences (up to 40 words) of another row's reply (``donor``; the request
    where that is blank, the reply itself where both are): the junk is as varied as the corpus, and off the
    point."""
    source = next((text for text in (donor, request, reply) if text.split()), None)
    if source is None:
        raise ValueError("cited: a blank reply has nothing to cite beside (applies() refuses it)")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", source) if s.split()]
    words: list[str] = []
    for sentence in sentences[rng.randrange(len(sentences)) :]:
        words += sentence.split()
        if len(words) >= 12:
            break
    quote = " ".join(words[:40]) + (" ..." if len(words) > 40 else "")
    names = [word.lower() for word in re.findall(r"[A-Za-z]{4,12}", source)]
    handles = (f"@{rng.choice(names)}{rng.randint(0, 99) or ''}",) if names else ()
    ref, verb = rng.choice(CITED_ANSWERS + handles), rng.choice(CITE_VERBS)
    if rng.random() < 0.5:
        cite = f'{rng.choice(CITE_LEADS)} {ref} {verb}, "{quote}"'
    else:
        cite = f"{ref[0].upper()}{ref[1:]} {verb}:\n> {quote}"
    return f"{cite}\n\n{reply.strip()}" if rng.random() < 0.5 else f"{reply.strip()}\n\n{cite}"


def _truncate(reply: str, rng: random.Random) -> str:
    cut = rng.randint(max(1, len(reply) // 4), max(1, len(reply) // 2))
    head = reply[:cut]
    if " " in head.strip():  # end on a word boundary when there is one
        head = head[: head.rstrip().rfind(" ")]
    return head.rstrip() or reply[0]


# ---------------------------------------------------------------------------- wrong final answers on CoT rows

_FINAL_ANSWER = re.compile(r"So the answer is (.+?)\.?\s*$", re.DOTALL)
_FLIPS = {"yes": "no", "no": "yes", "Sentence A": "Sentence B", "Sentence B": "Sentence A"}


def cot_wrong_answer(reply: str, rng: random.Random) -> str | None:
    """A FLAN-CoT reply ("... So the answer is X.") with X replaced by a wrong answer of the same
    form: yes/no and Sentence A/B flipped, another option letter, a nearby different number. None for
    replies without that ending or with a free-text answer (no wrong answer of the same form)."""
    match = _FINAL_ANSWER.search(reply)
    if not match:
        return None
    answer = match.group(1).strip()
    if answer in _FLIPS:
        wrong = _FLIPS[answer]
    elif re.fullmatch(r"\([A-E]\)", answer):
        wrong = "(" + rng.choice([c for c in "ABCDE" if c != answer[1]]) + ")"
    elif re.fullmatch(r"-?\d+", answer.replace(",", "")):
        value = int(answer.replace(",", ""))
        wrong = str(value + rng.choice([-1, 1]) * rng.randint(1, max(2, abs(value) // 2)))
    else:
        return None
    return reply[: match.start(1)] + wrong + reply[match.start(1) + len(match.group(1).rstrip(". ")) :]
