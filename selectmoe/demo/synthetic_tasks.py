"""Row generators for the demo corpus's four source datasets, shaped like the LESS mix.

- ``cot``: arithmetic word problems, "...\\nLet's think step by step." -> steps + "So the answer is X."
  (a third with aqua-style options);
- ``flan_v2``: templated short-answer tasks (sentiment, capitals, antonyms, word sorting, ...);
- ``dolly``: open questions and brainstorming with a few sentences of answer;
- ``oasst1``: multi-turn chats (1-3 exchanges, sometimes a system prompt).

Each generator returns an ``Example``: the messages and a fluent but wrong final reply, which the
``wrong_answer`` defect swaps in.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import NamedTuple

from selectmoe.demo.synthetic_facts import (
    ANIMAL_CLASSES,
    ANIMALS,
    ANTONYMS,
    CATEGORIES,
    COUNTRIES,
    ELEMENTS,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    PRODUCTS,
)
from selectmoe.demo.synthetic_math import near, render_steps, word_problem


class Example(NamedTuple):
    messages: list[dict]
    wrong: str  # a wrong final assistant reply that reads as well as the right one


CLASS_TRIVIA = {
    "mammal": "Like other mammals, it feeds its young with milk.",
    "bird": "Like other birds, it has feathers and lays eggs.",
    "reptile": "Like other reptiles, it has scaly skin.",
    "amphibian": "Like other amphibians, it starts its life in water.",
    "fish": "Like other fish, it breathes through gills.",
    "insect": "Like other insects, it has six legs.",
}
SORT_WORDS = sorted(
    {word for words in CATEGORIES.values() for word in words} | {a[0] for a in ANIMALS if " " not in a[0]}
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------- cot


def cot_example(rng: random.Random) -> Example:
    problem = word_problem(rng)
    wrong_value = near(rng, problem.answer)
    wrong_steps = [*problem.steps[:-1], problem.steps[-1]._replace(value=wrong_value)]
    if rng.random() < 1 / 3:
        options = [problem.answer]
        while len(options) < 5:
            candidate = near(rng, problem.answer)
            if candidate not in options:
                options.append(candidate)
        rng.shuffle(options)
        letters = "ABCDE"
        listed = "\n".join(f"({letter}) {value}" for letter, value in zip(letters, options))
        prompt = f"{problem.question}\nOptions:\n{listed}"
        right = f"({letters[options.index(problem.answer)]})"
        wrong_letter = rng.choice([letter for letter in letters if f"({letter})" != right])
        wrong_steps = [
            *problem.steps[:-1],
            problem.steps[-1]._replace(value=options[letters.index(wrong_letter)]),
        ]
        wrong = f"({wrong_letter})"
    else:
        prompt, right, wrong = problem.question, str(problem.answer), str(wrong_value)
    return Example(
        _chat(
            f"{prompt}\nLet's think step by step.",
            f"{render_steps(problem.steps)} So the answer is {right}.",
        ),
        f"{render_steps(wrong_steps)} So the answer is {wrong}.",
    )


# ---------------------------------------------------------------------------- flan


def _sentiment(rng: random.Random) -> tuple[str, str, str]:
    positive = rng.random() < 0.5
    first, second = rng.sample(POSITIVE_WORDS if positive else NEGATIVE_WORDS, 2)
    closing = rng.choice(
        ["I would buy it again.", "Highly recommended."]
        if positive
        else ["I want my money back.", "I would not recommend it."]
    )
    review = f"I bought this {rng.choice(PRODUCTS)} last month. It is {first} and {second}. {closing}"
    template = rng.choice(
        [
            "Review: {review}\nIs this product review positive or negative?",
            "{review}\n\nWhat is the sentiment of this review?\nOPTIONS:\n- negative\n- positive",
            "Classify the sentiment of the following review as positive or negative.\n\n{review}",
        ]
    )
    labels = ("positive", "negative") if positive else ("negative", "positive")
    return template.format(review=review), *labels


def _capital(rng: random.Random) -> tuple[str, str, str]:
    (country, capital, _, _), other = rng.sample(COUNTRIES, 2)
    template = rng.choice(
        [
            "Answer the following question.\nWhat is the capital of {country}?",
            "Q: Which city is the capital of {country}?\nA:",
        ]
    )
    return template.format(country=country), capital, other[1]


def _antonym(rng: random.Random) -> tuple[str, str, str]:
    pair, other = rng.sample(ANTONYMS, 2)
    word, opposite = pair if rng.random() < 0.5 else pair[::-1]
    template = rng.choice(['What is the opposite of "{word}"?', "Give the antonym of the word: {word}"])
    return template.format(word=word), opposite, rng.choice(other)


def _sort_words(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(SORT_WORDS, rng.randint(3, 6))
    right = sorted(words)
    wrong = list(right)
    while wrong == right:
        rng.shuffle(wrong)
    return (
        f"Sort the following words alphabetically: List: {' '.join(words)}",
        " ".join(right),
        " ".join(wrong),
    )


def _compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(1, 1000), 2)
    template = rng.choice(
        ["Is {a} greater than {b}? Answer yes or no.", "Question: Is {a} larger than {b}?\nAnswer yes or no."]
    )
    labels = ("yes", "no") if a > b else ("no", "yes")
    return template.format(a=a, b=b), *labels


def _symbol(rng: random.Random) -> tuple[str, str, str]:
    (element, symbol, _), other = rng.sample(ELEMENTS, 2)
    if rng.random() < 0.5:
        return f"What is the chemical symbol for {element}?", symbol, other[1]
    return f"Which element has the chemical symbol {symbol}?", element.capitalize(), other[0].capitalize()


def _language(rng: random.Random) -> tuple[str, str, str]:
    country, _, _, language = rng.choice(COUNTRIES)
    wrong = rng.choice([c[3] for c in COUNTRIES if c[3] != language])
    return f"What language do most people in {country} speak?", language, wrong


def _animal_class(rng: random.Random) -> tuple[str, str, str]:
    animal, cls, _, _ = rng.choice(ANIMALS)
    wrong = rng.choice([c for c in ANIMAL_CLASSES if c != cls])
    return f"Is the {animal} a mammal, bird, reptile, amphibian, fish or insect?", cls, wrong


_FLAN_TASKS = [_sentiment, _capital, _antonym, _sort_words, _compare, _symbol, _language, _animal_class]


def flan_example(rng: random.Random) -> Example:
    prompt, right, wrong = rng.choice(_FLAN_TASKS)(rng)
    return Example(_chat(prompt, right), wrong)


# ---------------------------------------------------------------------------- dolly


def _animal_sentence(animal: tuple) -> str:
    name, cls, diet, habitat = animal
    return f"The {name} is {article(cls)} {cls} that lives in {habitat}. It mainly eats {diet}. {CLASS_TRIVIA[cls]}"


def _describe_animal(rng: random.Random) -> tuple[str, str, str]:
    animal = rng.choice(ANIMALS)
    other = rng.choice([a for a in ANIMALS if a[1] != animal[1]])
    template = rng.choice(
        [
            "Tell me about the {name}.",
            "Write a short description of the {name}.",
            "What kind of animal is the {name}, and what does it eat?",
        ]
    )
    wrong = _animal_sentence((animal[0], *other[1:]))
    return template.format(name=animal[0]), _animal_sentence(animal), wrong


def _country_sentence(country: str, capital: str, continent: str, language: str) -> str:
    return f"{country[0].upper()}{country[1:]} is a country in {continent}. Its capital is {capital}, and most people there speak {language}."


def _describe_country(rng: random.Random) -> tuple[str, str, str]:
    country, other = rng.sample(COUNTRIES, 2)
    template = rng.choice(
        [
            "Tell me a few facts about {country}.",
            "What is the capital of {country}, and which continent is it in?",
        ]
    )
    wrong = _country_sentence(country[0], *other[1:])
    return template.format(country=country[0]), _country_sentence(*country), wrong


def _list_items(rng: random.Random) -> tuple[str, str, str]:
    category, other = rng.sample(sorted(CATEGORIES), 2)
    n = rng.randint(3, 5)
    template = rng.choice(
        ["Give me a list of {n} {category}.", "Name {n} {category}.", "Brainstorm {n} {category} for me."]
    )

    def listing(words: list[str]) -> str:
        return f"Here are {n} {category}:\n" + "\n".join(f"{i}. {word}" for i, word in enumerate(words, 1))

    return (
        template.format(n=n, category=category),
        listing(rng.sample(CATEGORIES[category], n)),
        listing(rng.sample(CATEGORIES[other], n)),
    )


def _odd_one_in(rng: random.Random) -> tuple[str, str, str]:
    cls = rng.choice(ANIMAL_CLASSES)
    match = rng.choice([a for a in ANIMALS if a[1] == cls])
    others = rng.sample([a for a in ANIMALS if a[1] != cls], 3)
    choices = [match, *others]
    rng.shuffle(choices)
    listed = ", ".join(a[0] for a in choices[:-1]) + f" or {choices[-1][0]}"

    def answer(pick: tuple) -> str:
        rest = " ".join(f"The {a[0]} is {article(a[1])} {a[1]}." for a in choices if a is not pick)
        return f"The {pick[0]} is the {cls} in this list. {rest}"

    prompt = f"Which of the following animals is {article(cls)} {cls}: {listed}?"
    return prompt, answer(match), answer(others[0])


_DOLLY_TASKS = [_describe_animal, _describe_country, _list_items, _odd_one_in]


def dolly_example(rng: random.Random) -> Example:
    prompt, right, wrong = rng.choice(_DOLLY_TASKS)(rng)
    return Example(_chat(prompt, right), wrong)


# ---------------------------------------------------------------------------- oasst


def _country_chat(rng: random.Random) -> list[tuple[str, str, str]]:
    (country, capital, continent, language), wrong = rng.sample(COUNTRIES, 2)
    neighbour = rng.choice([c for c in COUNTRIES if c[2] == continent and c[0] != country])
    named = f"{country[0].upper()}{country[1:]}"
    other_language = rng.choice([c[3] for c in COUNTRIES if c[3] != language])
    return [
        (
            f"Hi! Can you tell me something about {country}?",
            f"Sure! {named} is a country in {continent}. Its capital is {capital}.",
            f"Sure! {named} is a country in {wrong[2]}. Its capital is {wrong[1]}.",
        ),
        (
            "What language do people speak there?",
            f"Most people in {country} speak {language}.",
            f"Most people in {country} speak {other_language}.",
        ),
        (
            f"Thanks! Can you name another country in {continent}?",
            f"Of course. {neighbour[0][0].upper()}{neighbour[0][1:]} is also in {continent}, and its capital is {neighbour[1]}.",
            f"Of course. {wrong[0][0].upper()}{wrong[0][1:]} is also in {continent}, and its capital is {capital}.",
        ),
    ]


def _animal_chat(rng: random.Random) -> list[tuple[str, str, str]]:
    (name, cls, diet, habitat), other = rng.sample(ANIMALS, 2)
    wrong_class = rng.choice([c for c in ANIMAL_CLASSES if c != cls])
    return [
        (
            f"I'm curious about the {name}. What kind of animal is it?",
            f"The {name} is {article(cls)} {cls}. {CLASS_TRIVIA[cls]}",
            f"The {name} is {article(wrong_class)} {wrong_class}. {CLASS_TRIVIA[wrong_class]}",
        ),
        ("What does it eat?", f"It mainly eats {diet}.", f"It mainly eats {other[2]}."),
        ("And where does it live?", f"You can find it in {habitat}.", f"You can find it in {other[3]}."),
    ]


def _math_chat(rng: random.Random) -> list[tuple[str, str, str]]:
    turns = []
    for opening in ("Can you help me with this problem?", "Great, thanks! Here is another one:"):
        problem = word_problem(rng)
        wrong_value = near(rng, problem.answer)
        wrong_steps = [*problem.steps[:-1], problem.steps[-1]._replace(value=wrong_value)]
        turns.append(
            (
                f"{opening} {problem.question}",
                f"{render_steps(problem.steps)} So the answer is {problem.answer}.",
                f"{render_steps(wrong_steps)} So the answer is {wrong_value}.",
            )
        )
    return turns


_SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly assistant who answers briefly and accurately.",
]


def oasst_example(rng: random.Random) -> Example:
    chain = rng.choice([_country_chat, _animal_chat, _math_chat])(rng)
    turns = chain[: rng.randint(1, len(chain))]
    messages = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}] if rng.random() < 0.25 else []
    for user, reply, _ in turns:
        messages.extend(_chat(user, reply))
    return Example(messages, turns[-1][2])


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "cot": cot_example,
    "flan_v2": flan_example,
    "dolly": dolly_example,
    "oasst1": oasst_example,
}


def _chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
