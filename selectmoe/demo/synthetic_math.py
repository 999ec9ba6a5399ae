"""Arithmetic word problems for the demo corpus: CoT training rows and GSM8K/MMLU questions.

A problem is a question plus its solution steps (``a op b = c``), rendered as CoT sentences or
with GSM8K's ``<<a*b=c>>`` calculator annotations.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from selectmoe.demo.synthetic_facts import CONTAINERS, ITEMS, NAMES, PRODUCTS


class Step(NamedTuple):
    lead: str
    left: int
    op: str
    right: int
    value: int


class WordProblem(NamedTuple):
    question: str
    steps: list[Step]

    @property
    def answer(self) -> int:
        return self.steps[-1].value


def near(rng: random.Random, value: int) -> int:
    """A different, non-negative number close to ``value``."""
    delta = rng.randint(1, max(3, abs(value) // 3))
    return value - delta if value - delta >= 0 and rng.random() < 0.5 else value + delta


def word_problem(rng: random.Random) -> WordProblem:
    return rng.choice(_PROBLEMS)(rng)


def render_steps(steps: list[Step], *, calculator: bool = False, sep: str = " ") -> str:
    """CoT sentences; ``calculator`` adds GSM8K's ``<<a*b=c>>`` annotations."""
    sentences = []
    for step in steps:
        note = f"<<{step.left}{step.op}{step.right}={step.value}>>" if calculator else ""
        sentences.append(f"{step.lead} {step.left} {step.op} {step.right} = {note}{step.value}.")
    return sep.join(sentences)


def _gain_and_give(rng: random.Random) -> WordProblem:
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    c = rng.randint(1, a + b - 1)
    question = (
        f"{name} has {a} {item}. {name} buys {b} more {item} and then gives {c} of them to {friend}. "
        f"How many {item} does {name} have now?"
    )
    steps = [
        Step(f"After buying more, {name} has", a, "+", b, a + b),
        Step(f"After giving {c} away, {name} has", a + b, "-", c, a + b - c),
    ]
    return WordProblem(question, steps)


def _containers(rng: random.Random) -> WordProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    one, many = rng.choice(CONTAINERS)
    a, b, c = rng.randint(3, 24), rng.randint(2, 12), rng.randint(1, 30)
    question = (
        f"A {one} holds {a} {item}. {name} buys {b} {many} and already has {c} {item}. "
        f"How many {item} does {name} have in total?"
    )
    steps = [
        Step(f"The {b} {many} hold", b, "*", a, a * b),
        Step(f"Adding the {c} {item} {name} already has gives", a * b, "+", c, a * b + c),
    ]
    return WordProblem(question, steps)


def _change(rng: random.Random) -> WordProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, price = rng.randint(2, 9), rng.randint(2, 15)
    cost = a * price
    bill = next(note for note in (20, 50, 100, 200) if note > cost)
    question = (
        f"{name} buys {a} {item} that cost {price} dollars each and pays with a {bill}-dollar bill. "
        f"How much change, in dollars, does {name} get?"
    )
    steps = [
        Step(f"The {item} cost", a, "*", price, cost),
        Step("The change is", bill, "-", cost, bill - cost),
    ]
    return WordProblem(question, steps)


def _sharing(rng: random.Random) -> WordProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    question = (
        f"{name} has {friends * each} {item} and shares them equally among {friends} friends. "
        f"How many {item} does each friend get?"
    )
    return WordProblem(question, [Step("Each friend gets", friends * each, "/", friends, each)])


def _savings(rng: random.Random) -> WordProblem:
    name, product = rng.choice(NAMES), rng.choice(PRODUCTS)
    weekly, weeks = rng.randint(3, 25), rng.randint(2, 10)
    saved = weekly * weeks
    spent = rng.randint(1, saved - 1)
    question = (
        f"{name} saves {weekly} dollars every week for {weeks} weeks and then spends {spent} dollars on "
        f"a {product}. How many dollars does {name} have left?"
    )
    steps = [
        Step(f"In {weeks} weeks {name} saves", weekly, "*", weeks, saved),
        Step(f"After buying the {product}, {name} has", saved, "-", spent, saved - spent),
    ]
    return WordProblem(question, steps)


_PROBLEMS = [_gain_and_give, _containers, _change, _sharing, _savings]
