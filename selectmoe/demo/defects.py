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
paragraph citing another answer of the thread, absent here, and quoting it: another row's text); and, designed
later again, blind to every score, from the fluent but wrong outputs of model-generated instruction data (the
"wrong answers" and hallucinated details that Alpaca-cleaned corrected in Stanford Alpaca, the incorrect
outputs that Self-Instruct's own review counted): ``falsified`` (the reply word for word, with some of its
details, its numbers, names, key terms, yes/no-style words or option letters, each replaced throughout by
another of the same form: confidently wrong); and, designed later again, blind to every score, from the unfilled
template placeholders ("[Your Name]", "[insert ... here]", "{answer}") left in model-generated and templated
replies, which cleaning of such instruction data matches by their brackets and removes (a common filter; no
single published source is claimed here): ``placeholder`` (the reply with some of its sentences, or its answer,
replaced by slots such as "[Insert explanation here]" or "{final_answer}": a template never filled in). A spoiled
row is still a valid row: the defects are of quality, not of format, so only a quality score can find them.
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
    PLACEHOLDER_ANSWER_LABELS,
    PLACEHOLDER_FORMS,
    PLACEHOLDER_ITEM_LABELS,
    PLACEHOLDER_TEXT_LABELS,
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
    "falsified",
    "placeholder",
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

# ``falsified``: a detail's token, a number ("1,250", "3.5", "6th", a hash) or a word (a compound's part), not
# inside another word, a contraction, a URL's host or path or a path (a URL's scheme is a word)
_DETAIL = re.compile(r"(?<![\w'’/.@])(?:[A-Za-z]*\d[A-Za-z0-9]*(?:[.,]\d+)*|[A-Za-z]+)(?![\w'’/@]|\.\w)")
_FENCED_BLOCK = r"```.*?(?:```|$)"  # a code block, to its end
_CODE = re.compile(rf"({_FENCED_BLOCK}|`[^`\n]*`)", re.DOTALL)  # a code block or inline code
_LIST_NUMBER_END = re.compile(r"[.)](\s|$)")  # after a list's "1." or "2)"
_GOES_ON = re.compile(r"\s*[a-z0-9]")  # "no" in "no one", not an answer ("No.", "No, ...", "No I can't")
# words with a one-word opposite that turns the claim they make (a label, a comparison; "yes"/"no" as an
# answer)
_OPPOSITE_PAIRS = (
    ("yes", "no"),
    ("true", "false"),
    ("positive", "negative"),
    ("always", "never"),
    ("more", "less"),
    ("increase", "decrease"),
    ("increases", "decreases"),
    ("higher", "lower"),
    ("larger", "smaller"),
    ("bigger", "smaller"),
    ("better", "worse"),
    ("best", "worst"),
    ("before", "after"),
    ("can", "cannot"),
    ("possible", "impossible"),
    ("correct", "incorrect"),
    ("likely", "unlikely"),
    ("agree", "disagree"),
    ("first", "last"),
    ("up", "down"),
    ("safe", "dangerous"),
    ("legal", "illegal"),
)
_OPPOSITES = {**dict(_OPPOSITE_PAIRS), **{b: a for a, b in _OPPOSITE_PAIRS}}
# function words (and a task's own words): no detail to falsify (but those with an opposite), no replacement
_FUNCTION_WORDS = frozenset(
    word
    for words in (
        "a about above after again all also am an and any are as at be because been being both but by "
        "could did do does doing down during each even every few for from further had has have having he "
        "her here hers herself him himself his how however i if in into is it its itself just let me "
        "might must my myself nor not now of off on once only or other our ours out over own per please "
        "same she should so some such than that the their theirs them then there these they this those "
        "through thus to too under until up upon very was we were what when where whether which while who "
        "whom whose why will with within without would yet you your yours yourself well oh okay sure yeah "
        "hi hello thanks thank dear answer answers question questions option options sentence sentences "
        "step steps",
    )
    for word in words.split()
)
_SHORT_REPLY = 12  # words at most: a short answer, every word of which is a detail
_MAX_FALSIFIED = 8  # distinct details changed at most: a wrong reply, not a rewritten one

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
    if kind == "falsified":
        return _falsify(reply, rng, donor, request)
    if kind == "placeholder":
        return _placeholder(reply, rng)
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
    if kind == "falsified":
        # a reply with no number or word outside code has no detail to falsify (blank, code only, "★★★",
        # another script): it applies to 98.8% of the shared real rows and 99.7% of those with a reply that
        # is not blank; per file, of all its rows: every CoT row, 96.7% of FLAN's (it refuses their 2.6% of
        # blank TREC replies), 99.7% of oasst1's, 99.2% of human_instructions'; and to every family row
        return any(_details(reply))
    if kind == "placeholder":
        # a reply with no word or number outside code blocks has nothing to leave unfilled (blank, code only,
        # "★★★", emoji): it applies to 98.9% of the shared real rows and 99.87% of those with a reply that is not
        # blank; per file, of all its rows: every CoT row, 97.05% of FLAN's (it refuses their 2.6% of blank TREC
        # replies and their star ratings), 99.73% of oasst1's, 99.74% of human_instructions'
        return bool(_slot_units(reply))
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


def _falsify(reply: str, rng: random.Random, donor: str, request: str = "") -> str:
    """The reply word for word, but with a third (one at least, ``_MAX_FALSIFIED`` at most) of its details
    each replaced, at every place it has outside code, by a false one of the same form: a fluent reply that is
    confidently wrong, as the "wrong answers" and hallucinated details of model-generated instruction data
    are.

    The details (``_details``) are its numbers, words with a one-word opposite, option letters and names
    (words capitalised inside a sentence), changed first, then its words of the request; in a short answer,
    any of its words alike; in a longer reply with none of those, its longer words. A number gets one of its
    last two digits changed ("1994" -> "1997", a list's "1." is left alone); a word its opposite ("yes" ->
    "no", "positive" -> "negative", "can" -> "cannot"); an option letter another the request offers ("Sentence
    B" -> "Sentence A"); a name or another word a word of the same kind (a name, or a lowercase word with the
    same ending: "-ing", "-ed", "-s", ...) and nearest length from another row's reply (``donor``) or from the
    request (either first, at random), else another of the reply's own (its terms mixed up) -- and where none
    has one, any word of those texts, or its own letters shuffled -- in the case of each place it replaces,
    with an "a"/"an" before it agreeing. So every changed word but the fixed opposites (and a shuffled
    one-word reply) is the row's own text or the corpus's vocabulary, and every changed number a digit: no
    phrase recurs across rows, and the reply keeps its length, its layout and all but a few of its words.

    Known quirks, kept because the kind was measured with them: the ending rule holds for names too; an
    ordinal or decade keeps its suffix ("2nd" -> "8nd"); "a"/"an" agrees with a replaced word, not a
    number, and by its first letter ("an university"); opposites ignore sense ("a can" -> "a cannot");
    only ASCII words are details; a URL's scheme can be replaced ("https" -> another word)."""
    tiers = _details(reply, request)
    details = [key for tier in tiers for key in tier]
    if not details:
        raise ValueError(
            "falsified: a reply without a word or number outside code has no detail to falsify"
            " (applies() refuses it)"
        )
    used = set(_detail_words(reply))
    names = _capitalised_words(reply) | _capitalised_words(request)
    wanted = min(_MAX_FALSIFIED, max(1, -(-len(details) // 3)))
    replacement: dict[str, str] = {}
    # each detail in turn, a tier's in random order, until a third have a false one
    for key in [key for tier in tiers for key in rng.sample(tier, len(tier))]:
        if len(replacement) == wanted:
            break
        if _is_number(key):
            replacement[key] = _other_number(key, rng)
        elif key in _OPPOSITES:
            replacement[key] = _OPPOSITES[key]
        elif len(key) == 1:  # an option letter: another of the request's, else of A-B (or A-E past B)
            offered = {match.group() for match in _DETAIL.finditer(request) if _is_option(request, match)}
            letters = sorted(offered - {key}) or [c for c in ("AB" if key in "AB" else "ABCDE") if c != key]
            replacement[key] = rng.choice(letters)
        else:
            others = (donor, request) if rng.random() < 0.5 else (request, donor)
            word = _other_word(key, key in names, rng, others, used)
            if word is None:  # another word of the reply's own: two of its terms swapped
                taken = {key, *replacement, *(new.lower() for new in replacement.values())}
                word = _other_word(key, key in names, rng, (reply,), taken)
            if word is not None:
                used.add(word.lower())
                replacement[key] = word
    # no word of the same kind anywhere: any word of the other texts, or its letters shuffled
    if not replacement:
        key, others = details[0], (donor, request)
        word = _other_word(key, key in names, rng, others, used, ending=False)
        word = word or _other_word(key, key in names, rng, others, used, ending=False, kind=False)
        replacement[key] = word or _anagram(key, rng)
    parts = _CODE.split(reply)  # the odd parts are code, left alone
    parts[::2] = [_replace_details(part, replacement) for part in parts[::2]]
    return "".join(parts)


def _prose(text: str) -> str:
    """``text`` without its code blocks and inline code."""
    return "\n".join(_CODE.split(text)[::2])


def _detail_words(text: str) -> list[str]:
    return [match.group().lower() for match in _DETAIL.finditer(_prose(text))]


def _sentence_initial(text: str, start: int) -> bool:
    before = start - 1
    while before >= 0 and text[before] in " \t":
        before -= 1
    return before < 0 or text[before] in ".!?:;\n\"'(*#>-“"


def _capitalised_words(text: str) -> set[str]:
    """The words that ``text`` capitalises inside a sentence (names, lowercased), function words apart."""
    prose = _prose(text)
    return {
        match.group().lower()
        for match in _DETAIL.finditer(prose)
        if match.group()[0].isupper()
        and len(match.group()) > 1
        and match.group().lower() not in _FUNCTION_WORDS
        and not _sentence_initial(prose, match.start())
    }


def _details(reply: str, request: str = "") -> list[list[str]]:
    """The reply's details that ``falsified`` can change, by ``_detail_key``, in tiers to change first to
    last: its numbers, words with an opposite, option letters and names; then its words of the request (four
    letters or more). A longer reply with none of these has its words of four letters or more instead; a short
    one (``_SHORT_REPLY`` words at most: a short answer) has all of these and its other words of four letters
    or more in one tier. Either has its words of three letters where it has nothing else. Function words
    never."""
    prose = _prose(reply)
    asked = set(_detail_words(request)) - _FUNCTION_WORDS
    names = _capitalised_words(reply)
    facts: dict[str, None] = {}
    terms: dict[str, None] = {}
    words: dict[str, None] = {}
    short: dict[str, None] = {}
    matches = list(_DETAIL.finditer(prose))
    for match in matches:
        key = _detail_key(prose, match)
        if not key or key in _FUNCTION_WORDS and key not in _OPPOSITES:
            continue
        if _is_number(key) or key in _OPPOSITES or len(key) == 1 or key in names:
            facts[key] = None
        elif len(key) > 3:
            (terms if key in asked else words)[key] = None
        elif len(key) == 3:
            short[key] = None
    if len(matches) <= _SHORT_REPLY:
        tiers = [{**facts, **terms, **words}]
    else:
        tiers = [facts, terms] if facts or terms else [words]
    tiers = [list(tier) for tier in tiers if tier]
    return tiers or ([list(short)] if short else [])


def _detail_key(prose: str, match: re.Match) -> str:
    """How ``falsified`` names the token ``match``: a number as written, an option letter in upper case, a
    word lowercased; "" for none (a list's number, a letter that is no option, a "no" that goes on as in "no
    one", a question's "Can")."""
    token = match.group()
    if _is_number(token):
        list_number = _LIST_NUMBER_END.match(prose, match.end()) and _line_start(prose, match.start())
        return "" if list_number else token
    if _is_option(prose, match):
        return token
    key = token.lower()
    if len(key) == 1 or key in ("yes", "no") and _GOES_ON.match(prose, match.end()):
        return ""
    if key == "can" and _sentence_initial(prose, match.start()):
        return ""  # a question's "Can you ...?" ("Cannot you ...?" is no sentence)
    return key


def _is_number(token: str) -> bool:
    return any(ch.isdigit() for ch in token)


def _line_start(text: str, start: int) -> bool:
    return not text[text.rfind("\n", 0, start) + 1 : start].strip(" \t#*>-")


def _is_option(prose: str, match: re.Match) -> bool:
    """A letter A-E that names an option: the whole reply ("C"), "(C)", "Sentence B", "Option D"."""
    token, start, end = match.group(), match.start(), match.end()
    if len(token) != 1 or token not in "ABCDE":
        return False
    return (
        prose.strip(" .()\n") == token
        or (prose[start - 1 : start] == "(" and prose[end : end + 1] == ")")
        or any(prose.endswith(lead, 0, start) for lead in ("Sentence ", "Option ", "option ", "answer is "))
    )


def _other_number(number: str, rng: random.Random) -> str:
    """``number`` with one of its last two digits changed (a leading one to another non-zero digit)."""
    places = [i for i, ch in enumerate(number) if ch.isdigit()]
    place = rng.choice(places[-2:])
    digits = "123456789" if place == 0 and len(places) > 1 else "0123456789"
    return number[:place] + rng.choice([d for d in digits if d != number[place]]) + number[place + 1 :]


def _ending(word: str) -> str:
    """The inflection a word ends in ("" for none), as near to its part of speech as spelling gets."""
    word = word.lower()
    ends = ("ing", "ed", "ly", "ion", "er", "ss", "us", "is", "s")
    end = next((end for end in ends if word.endswith(end)), "")
    return "" if end in ("ss", "us", "is") else end


def _other_word(
    key: str,
    is_name: bool,
    rng: random.Random,
    sources: Sequence[str],
    used: set[str],
    ending: bool = True,
    kind: bool = True,
) -> str | None:
    """A word for the word ``key`` from the first of ``sources`` that has one, of none of the ``used`` words
    and nearest in length: a name for a name and a lowercase word for another (where ``kind``), with the same
    ending (where ``ending``). None where none has one."""
    for source in sources:
        names = _capitalised_words(source)
        pool = [
            word
            for word in dict.fromkeys(match.group() for match in _DETAIL.finditer(_prose(source)))
            if word.isalpha()
            and len(word) > 2
            and word.lower() not in used
            and word.lower() not in _FUNCTION_WORDS
            and word.lower() not in _OPPOSITES
            and (not kind or (word.lower() in names) == is_name and (is_name or word.islower()))
            and (not ending or _ending(word) == _ending(key))
        ]
        if pool:
            nearest = min(abs(len(word) - len(key)) for word in pool)
            return rng.choice([word for word in pool if abs(len(word) - len(key)) == nearest])
    return None


def _anagram(key: str, rng: random.Random) -> str:
    """``key``'s letters shuffled (a one-word reply, with no other text to draw a word from)."""
    letters = list(key)
    for _ in range(10):
        rng.shuffle(letters)
        if "".join(letters) != key:
            return "".join(letters)
    return key[:-1] + rng.choice([ch for ch in "aeiou" if ch != key[-1]])  # one letter repeated ("aaa")


def _replace_details(text: str, replacement: dict[str, str]) -> str:
    """``text`` with each token whose ``_detail_key`` is in ``replacement`` replaced, in the case it has there
    (lower, capitalised or upper), and an "a"/"an" right before a replaced word made to agree with it."""
    pieces: list[str] = []
    end = 0
    for match in _DETAIL.finditer(text):
        token = match.group()
        new = replacement.get(_detail_key(text, match))
        if new is None:
            continue
        if token.isupper() and len(token) > 1:
            new = new.upper()
        elif token[0].isupper():
            new = new[0].upper() + new[1:]
        gap = text[end : match.start()]
        article = re.search(r"(?<![\w'’])(an?|An?|AN?) $", gap)
        if article and new[0].isalpha():
            agreed = "an" if new[0].lower() in "aeiou" else "a"
            written = article.group(1)
            if written.isupper() and len(written) > 1:
                agreed = agreed.upper()
            elif written[0].isupper():
                agreed = agreed.capitalize()
            gap = gap[: article.start(1)] + agreed + " "
        pieces += [gap, new]
        end = match.end()
    return "".join(pieces) + text[end:]


_LIST_MARKER = re.compile(r"[ \t]*(?:(?:[-*+>]|\d+[.)]|#+)[ \t]+)*")  # a line's list, quote or heading marks
_SENTENCE_END = re.compile(r"(?<=[.!?])[ \t]+")
_UNIT_END = ".!?:;,\"'*"  # what a unit keeps after its slot: its closing punctuation (and spaces)
_ANSWER_TAIL = re.compile(r"\b(?:answer|result) is:? ", re.IGNORECASE)
_FENCED = re.compile(rf"({_FENCED_BLOCK})", re.DOTALL)
_MAX_SLOTS = 6  # slots at most: a template left half filled, not an outline
# the labels a slot can have, by what it stands in for
PLACEHOLDER_LABELS = {
    "answer": PLACEHOLDER_ANSWER_LABELS,
    "item": PLACEHOLDER_ITEM_LABELS,
    "text": PLACEHOLDER_TEXT_LABELS,
}


def placeholder_slot(form: str, label: str) -> str:
    """A slot written in ``form`` (one of ``PLACEHOLDER_FORMS``) for ``label``."""
    return form.format(
        label=label, Label=label.capitalize(), LABEL=label.upper(), snake=label.replace(" ", "_")
    )


def _slot_units(reply: str) -> list[tuple[int, int, str, int]]:
    """The reply's units that ``placeholder`` can leave unfilled, as (start, end, kind, words): each sentence of
    its prose (outside code blocks) without its line's list, quote or heading marks and its closing punctuation,
    of kind "item" (a list's line), "answer" (three words at most) or "text"; a unit needs a word character."""
    units = []
    offset = 0
    for i, part in enumerate(_FENCED.split(reply)):
        if i % 2 == 0:
            line_start = offset
            for line in part.split("\n"):
                marker = _LIST_MARKER.match(line).end()
                is_item = bool(line[:marker].strip(" \t#>"))
                body_start = line_start + marker
                for sentence in _SENTENCE_END.split(line[marker:]):
                    start = reply.index(sentence, body_start) if sentence else body_start
                    content = _without_unit_end(sentence)
                    if re.search(r"\w", content):
                        n_words = len(content.split())
                        kind = "item" if is_item else "answer" if n_words <= 3 else "text"
                        units.append((start, start + len(content), kind, n_words))
                    body_start = start + len(sentence)
                line_start += len(line) + 1
        offset += len(part)
    return units


def _without_unit_end(sentence: str) -> str:
    """``sentence`` without its trailing spaces and ``_UNIT_END`` characters (in linear time, where a regex
    anchored at the end is quadratic on a long run of them)."""
    while (shorter := sentence.rstrip().rstrip(_UNIT_END)) != sentence:
        sentence = shorter
    return sentence


def _placeholder(reply: str, rng: random.Random) -> str:
    """The reply with some of its content left as unfilled template slots ("[Insert explanation here]",
    "{final_answer}", "<insert step here>"), one way of writing a slot for the whole reply: a template or
    model-generated answer whose blanks were never filled in, the unfilled "[Your Name]" / "[insert ... here]" /
    "{answer}" placeholders that cleaning of model-generated instruction data matches and removes.

    A reply of several units (``_slot_units``: its sentences outside code) has a fifth to a half of them (one at
    least, all but one at most, ``_MAX_SLOTS`` at most) replaced whole by a slot labelled by what it stands in
    for (an answer, a list's item, a sentence), a sentence of more than three words rather than a heading or a
    greeting where it has one; a reply of one unit, an answer, keeps its opening words and has the rest replaced
    (a unit of three words or fewer, all of it). A unit with "answer is " ("So the answer is yes.")
    keeps all up to there. Each unit keeps its list marks and closing punctuation; fenced code is left alone.
    Quirks: inline code, abbreviations ("e.g.") and nested quote marks without a space (">>text") are split
    or slotted as prose."""
    units = _slot_units(reply)
    if not units:
        raise ValueError(
            "placeholder: a reply without a word or number outside code has nothing to leave unfilled"
        )
    form = rng.choice(PLACEHOLDER_FORMS)
    # a sentence (more than three words) rather than a heading, a greeting or a list's term, where it has one
    candidates = [unit for unit in units if unit[3] > 3] or units
    if len(units) == 1:
        chosen = units
    else:
        wanted = max(1, round(len(candidates) * rng.uniform(0.2, 0.5)))
        chosen = sorted(rng.sample(candidates, min(_MAX_SLOTS, len(units) - 1, len(candidates), wanted)))
    pieces, end = [], 0
    for start, stop, kind, n_words in chosen:
        text = reply[start:stop]
        answer = _ANSWER_TAIL.search(text)
        if answer and answer.end() < len(text):
            start, kind = start + answer.end(), "answer"
        elif len(units) == 1:  # the reply's answer (its opening words kept)
            kind = "answer"
            if n_words > 3:
                words = list(re.finditer(r"\S+", text))
                start += words[rng.randint(1, n_words // 2)].start()
        slot = placeholder_slot(form, rng.choice(PLACEHOLDER_LABELS[kind]))
        pieces += [reply[end:start], slot]
        end = stop
    return "".join(pieces) + reply[end:]


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
