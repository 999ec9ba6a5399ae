"""Does a selection help the model finetuned on it? A downstream proxy on CPU.

Per seed, a pool of rows:
- ``--families`` synthetic task families: each is a made-up language, with a code word for each of the
  same ``WORDS`` built from syllables of its own two consonants, asked in three question templates
  ("In Zorbish, what is the word for 'cat'?"). A family's held-out items ask its codes in a fourth
  template the pool never uses; their answers can be predicted well only from that family's rows (no
  other family has its syllables). A tiny target learns a family's sounds much sooner than its
  codebook, so this is closer to domain knowledge than to a skill;
- ``--real-rows`` real rows from ``../shared/data/train`` as distractors (``--data-dir``: from another
  folder, such as ``eval_corpus.py``'s corpus no key was chosen on; the selector and the target are
  LM-pretrained on rows of ``../shared/data/train`` either way);
- ``--defect-rate`` of all rows spoiled (``selectmoe.demo.defects``; ``wrong_answer`` gives a family
  row another word's code).

The first ``--targets`` families are the target tasks: ``--target-examples`` of their held-out items
are the examples a target-aware method sees (LESS / RDS+ use ~8 per task), the rest are scored.

The product runs stage 1 (``pretrain``) and stage 2 (``select`` with ``selection.method=similarity``,
storing NLL, prompt gain, gates and embeddings in one scoring pass) on the pool, with a tiny OLMoE
selector LM-pretrained on other real rows, its NLLs measured with the model the default preset measures
them with (``scoring.nll_model``: the base model; results before it used the stage-1 model's). Every
other method is taken from the same score files.
Each selection (5% of the pool; ``full`` is every row) finetunes the same tiny Llama target (LM-pretrained
on real rows, all weights trained, ``--steps`` steps of ``--batch`` rows), which is then judged three ways:
- **target-task NLL**: its mean NLL of the right answer on the held-out items of the target families
  (and of the others; **all-family NLL**: of all six). This rewards target rows, which no score without
  targets can find;
- **clean-reply NLL**: its mean NLL of the replies of ``--clean-rows`` real rows that are in neither the
  pool nor any model's LM rows, none spoiled. This is what a junk filter should improve: how well the
  finetuned model writes the corpus's kind of reply. ``clean_random`` (a seeded draw among the pool's
  clean rows, which needs the labels) is the best a junk filter can do; random draws are the floor.
- **junk margin**: how much higher its per-token NLL of a spoiled version of each clean reply is than of
  the reply itself (lm-eval's comparison of two continuations, per token), averaged over the kinds the
  pool was spoiled by (``--defect-kinds``; ``wrong_answer`` is not judged: a tiny target cannot know the
  right final answer), and apart over the kinds it was not (``absent_kinds_junk_margin``): a model that
  learned from junk prefers junk more. Its share of pairs the right way round is ``junk_accuracy``. The
  measure can judge a junk filter when ``clean_balanced_random`` beats ``balanced_random`` on it by more
  than 2 standard errors (``junk_measure_valid``); ``--defect-kinds looped echo`` spoils the pool only by
  kinds no score was tuned on, ``--defect-kinds restated doubled canned`` by kinds designed later.

What each selection keeps is reported beside: per kind of pool row (``clean`` or a defect kind), its
keep rate (its share of the selection over its share of the pool: 1 is a random draw's, 0 none) and the
kind's mean NLL, prompt gain and reply redundancy as stage 2 scored them (``pool_kinds``): why a filter
keeps a kind; and what its clean real rows are like: their mean reply length and the share of them whose
reply is one of their dataset's six commonest (a likelihood filter can keep a dataset's short, frequent
answers and leave its rarer ones).

Methods: ``random`` (``--random-draws`` seeded draws), ``full`` (the whole pool), ``oracle`` (clean rows
of the target families), ``perplexity`` (lowest NLL), ``gates`` (mean gate), ``gates_prompt_gain`` (top
rows by that preset's score), ``gates_prompt_gain_balanced`` (the same, with per-dataset quotas as
``selection.balance=dataset`` keeps the pool's mix), ``filtered_random_nll_prompt_gain`` and
``filtered_random_nll`` and ``filtered_random_nll_8x_prompt_gain`` (``selection.method=filtered_random``:
a random draw among the better half of each dataset by z(-NLL) + z(prompt gain), by NLL alone, or by
-2 z(NLL) + 0.25 z(prompt gain); the summary's ``default`` names the one the default preset is),
``filtered_random_raw_nll_prompt_gain`` (the same draw by -NLL + prompt gain in nats,
``scoring.combine=raw``), ``filtered_random_raw_nll_capped_prompt_gain`` (the same with the prompt gain
capped at its median, ``scoring.prompt_gain_cap=median``), ``filtered_random_raw_nll_quartile_prompt_gain``
(capped at its lower quartile), ``filtered_random_raw_nll_quartile_prompt_gain_redundancy`` (the same
minus 8 x the reply redundancy beyond 0.4, ``scoring.redundancy_weight``/``redundancy_tolerance``),
``filtered_random_raw_nll_quartile_prompt_gain_redundancy_commonness`` (the same minus 8 x the reply
commonness beyond 0.25, ``scoring.commonness_weight``/``commonness_tolerance``),
``balanced_random`` (the same draw keeping every row: the pool's mix
by quotas, no filter; a filter's margin over it is what the filter itself buys),
``diversity`` (``selection.method=diversity``, the seed's: cosine k-means of the rows' routing features
into ``clustering_params.k`` clusters, then rows round-robin over the clusters in the default preset's
score order; a draw is a k-means seed), ``diversity_random_order`` (the same clusters, each in a seeded
random order: what the clusters alone buy), ``filtered_random_pooled`` (the default's filter and draw with
the pool as one dataset: what a corpus without dataset labels gets), ``filtered_random_by_cluster`` (the
same with the diversity draw's routing clusters as the datasets: each cluster's better half, quotas in
proportion to cluster size), ``cluster_balanced_random`` (those quotas, no filter),
``filtered_random_by_length`` (the default's filter and draw with each dataset cut into quarters by reply
length as the strata: the better half of each quarter, quotas per quarter, so the kept replies keep the
dataset's lengths), ``filtered_random_by_reply`` (the same with ``selection.strata=reply``: each reply 5 or more rows and 1% of
a dataset give is a stratum, the rest one more, so the kept rows keep the dataset's answer mix),
``filtered_random_by_reply_without_nll`` (those strata with the filter below, without -NLL),
``filtered_random_raw_prompt_gain_redundancy`` (the default's filter without its -NLL term, the prompt gain
uncapped: does the likelihood term make the filter keep frequent answers?), ``filtered_random_keep70`` and
``filtered_random_keep85`` (the default's filter keeping each dataset's best 70% or 85%, not half: does a
milder filter skew the clean rows it keeps less?), ``similarity`` (the product's RDS+ selection),
``calibrated`` (the product's calibrated mode, the target examples as its trusted rows), ``clean_random``
(a random draw among the clean rows: a junk filter's ceiling; family rows can be spoiled more ways than
real rows, so it holds fewer of them than the pool's share) and ``clean_balanced_random`` (the same among the clean rows by the pool's quotas: the ceiling of a filter
that keeps the mix, as ``filtered_random`` does; each of its draws is ``balanced_random``'s draw of the
same seed with the spoiled rows replaced by the next clean ones, so the two compare nearly paired).

The drawn methods are judged by the mean of their draws: ``--random-draws`` of ``random``, ``--draws`` of
``clean_random``, ``clean_balanced_random``, ``balanced_random``, each filter and the two diversity
selections, each draw with its own
seed (the first is the draw used before ``--draws`` existed). A margin is the random draws' mean NLL
minus the method's (positive: better than random), averaged over the seeds, with a standard error from
both methods' draws' spread in each seed.

The proxy is valid when ``oracle`` and ``full`` beat ``random`` by more than 2 standard deviations of
the random draws, in every seed; until then the methods' numbers say nothing. The clean-reply measure
is valid in a seed when ``clean_random`` beats the random draws' clean-reply NLL by more than 2 of
their standard deviations.

    .venv/bin/python benchmarks/downstream_proxy.py --seeds 0 1 2 --json benchmarks/results/downstream_proxy.json

Each finetune's result is cached in the work folder by what it reads, so a rerun with other ``--methods``
trains only those (random, full, oracle, clean_random, balanced_random and clean_balanced_random always run).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from common import TRAIN_DIR, lm_pretrained_tiny, quiet_ray, quiet_transformers, sample_rows, write_json
from selection_quality import reselect
from selection_quality import run_stages as run_stages_of_the_product

from selectmoe.config import ClusteringParams, PipelineConfig, ScoringSection, SelectionSection, load_preset
from selectmoe.demo.defects import DEFECT_KINDS, HELD_OUT_KINDS, applies, plant_defects, request_of, spoil
from selectmoe.manifest import hash_dict

WORDS = [
    "cat", "dog", "house", "river", "tree", "bread", "moon", "stone", "fire", "water", "bird", "road",
    "apple", "window", "book", "friend", "night", "sun", "horse", "chair", "ship", "mountain", "salt",
    "rain", "door", "garden", "winter", "milk", "king", "song", "wolf", "cloud",
]  # fmt: skip
LANGUAGES = ["Zorbish", "Quellan", "Marundi", "Tovic", "Elbari", "Sunekko", "Drevian", "Palomi"]
CONSONANTS = "bdfghjklmnprstvz"  # two per language: its code words share no syllable with another's
VOWELS = "aeiou"
POOL_TEMPLATES = [
    ("In {lang}, what is the word for '{word}'?", "In {lang}, '{word}' is {code}."),
    ("How do {lang} speakers say '{word}'?", "They say {code}."),
    ("Give the {lang} word for '{word}'.", "The {lang} word for '{word}' is {code}."),
]
HELD_OUT_TEMPLATE = ("Translate '{word}' into {lang}.", "{code}")
GATES_PROMPT_GAIN = load_preset("gates_prompt_gain")["keys"]["select"]  # the former default's weights
DEFAULT = load_preset(PipelineConfig().preset)["keys"]["select"]  # the default preset's score and keep share
# filtered_random's draw among each dataset's better half by -NLL x w1 + prompt gain x w2 - w3 x max(reply
# redundancy - t, 0) - w4 x max(reply commonness - t4, 0), the first two a robust z-score or in nats
# (scoring.combine), the prompt gain capped at its median, its lower quartile or not (scoring.prompt_gain_cap):
# (w1, w2, combine, cap, w3, t, w4, t4)
_QUARTILE_REDUNDANCY = (1.0, 1.0, "raw", "lower_quartile", 8.0, 0.4)
FILTERED_RANDOM_RECIPES = {
    "filtered_random_nll_prompt_gain": (1.0, 1.0, "robust_z", "none", 0.0, 0.0, 0.0, 0.0),
    "filtered_random_nll": (1.0, 0.0, "robust_z", "none", 0.0, 0.0, 0.0, 0.0),
    # loko.py's one gate-free recipe level with perplexity
    "filtered_random_nll_8x_prompt_gain": (2.0, 0.25, "robust_z", "none", 0.0, 0.0, 0.0, 0.0),
    "filtered_random_raw_nll_prompt_gain": (1.0, 1.0, "raw", "none", 0.0, 0.0, 0.0, 0.0),
    "filtered_random_raw_nll_capped_prompt_gain": (1.0, 1.0, "raw", "median", 0.0, 0.0, 0.0, 0.0),
    "filtered_random_raw_nll_quartile_prompt_gain": (1.0, 1.0, "raw", "lower_quartile", 0.0, 0.0, 0.0, 0.0),
    "filtered_random_raw_nll_quartile_prompt_gain_redundancy": (*_QUARTILE_REDUNDANCY, 0.0, 0.0),
    "filtered_random_raw_nll_quartile_prompt_gain_redundancy_commonness": (*_QUARTILE_REDUNDANCY, 8.0, 0.25),
    # the default without its likelihood term: does -NLL make the filter keep a dataset's frequent answers?
    "filtered_random_raw_prompt_gain_redundancy": (0.0, 1.0, "raw", "none", 8.0, 0.4, 0.0, 0.0),
}
KEEP_FRACTIONS = (0.7, 0.85)  # filtered_random_keepNN: the default's filter keeping NN% of each dataset
METHODS = (
    "full", "oracle", "perplexity", "gates", "gates_prompt_gain", "gates_prompt_gain_balanced",
    *FILTERED_RANDOM_RECIPES, "balanced_random", "similarity", "calibrated", "clean_random",
    "clean_balanced_random", "diversity", "diversity_random_order", "filtered_random_pooled",
    "filtered_random_by_cluster", "cluster_balanced_random", "filtered_random_by_length",
    "filtered_random_by_reply", "filtered_random_by_reply_without_nll",
    *(f"filtered_random_keep{round(100 * keep)}" for keep in KEEP_FRACTIONS),
)  # fmt: skip  # besides the random draws
ALWAYS_RUN = (
    "random",
    "full",
    "oracle",
    "clean_random",
    "balanced_random",
    "clean_balanced_random",
)  # the validity checks
CLEAN = "clean replies"  # the held-out group of clean real rows, beside the families
# each finetune's measures: mean NLLs (lower is better) and its preference for clean replies over spoiled
# ones (higher is better)
MEASURES = (
    "target_nll",
    "other_nll",
    "family_nll",
    "clean_nll",
    "junk_margin",
    "junk_accuracy",
    "absent_kinds_junk_margin",
)
HIGHER_IS_BETTER = ("junk_margin", "junk_accuracy", "absent_kinds_junk_margin")


def default_method() -> str:
    """The row that is the default preset's recipe (filtered_random, no gate term): its score's row, or
    ``filtered_random_by_reply`` where the default's strata are the frequent replies."""
    from selectmoe.select.driver import uses_reply_strata

    assert DEFAULT["selection"]["method"] == "filtered_random" and not DEFAULT["scoring"]["gate_weight"]
    if uses_reply_strata(SelectionSection(**DEFAULT["selection"])):
        return "filtered_random_by_reply"
    return default_score_method()


def default_score_method() -> str:
    """The row of the default preset's score with dataset strata (the score every stratified filter,
    ``diversity`` and ``filtered_random_by_reply`` order by)."""
    scoring = DEFAULT["scoring"]
    weights = (
        scoring["perplexity_weight"],
        scoring["prompt_gain_weight"],
        scoring["combine"],
        scoring.get("prompt_gain_cap", "none"),
        scoring.get("redundancy_weight", 0.0),
        scoring.get("redundancy_tolerance", 0.0),
        scoring.get("commonness_weight", 0.0),
        scoring.get("commonness_tolerance", 0.0),
    )
    return next(name for name, recipe in FILTERED_RANDOM_RECIPES.items() if recipe == weights)


def main() -> int:
    args = parse_args()
    quiet_transformers()
    quiet_ray()
    work = Path(args.work_dir)
    per_seed = []
    for seed in args.seeds:
        started = time.time()
        result = run_seed(args, seed, work / f"seed{seed}")
        result["seconds"] = round(time.time() - started, 1)
        per_seed.append(result)
        print_seed(result)
    summary = summarise(per_seed)
    print_summary(summary)
    write_json(args.json, {"args": vars(args), "per_seed": per_seed, "summary": summary})
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work-dir", default="/tmp/selectmoe_downstream_proxy")
    p.add_argument("--families", type=int, default=6)
    p.add_argument("--targets", type=int, default=2, help="the first N families are the target tasks")
    p.add_argument("--target-examples", type=int, default=8, help="held-out items per target task shown")
    p.add_argument("--real-rows", type=int, default=1200)
    p.add_argument(
        "--data-dir", default=str(TRAIN_DIR), help="the real rows of the pool and of the clean replies judged"
    )
    p.add_argument(
        "--clean-rows", type=int, default=300, help="held-out real rows whose replies judge every finetune"
    )
    p.add_argument("--defect-rate", type=float, default=0.3)
    p.add_argument(
        "--defect-kinds",
        nargs="+",
        choices=DEFECT_KINDS + HELD_OUT_KINDS,
        default=list(DEFECT_KINDS),
        help="the kinds the pool is spoiled by (the held-out kinds: junk no score was tuned on)",
    )
    p.add_argument("--percentage", type=float, default=0.05)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lm-steps", type=int, default=300, help="LM pretraining of the selector and the target")
    p.add_argument("--stage1-steps", type=int, default=40)
    p.add_argument("--stage1-batch", type=int, default=16)
    p.add_argument("--subset-ratio", type=float, default=0.4, help="share of the pool stage 1 trains on")
    p.add_argument("--steps", type=int, default=200, help="finetuning steps per selection")
    p.add_argument("--finetune-max-length", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--random-draws", type=int, default=3)
    p.add_argument(
        "--draws",
        type=int,
        default=1,
        help="seeded draws of each other drawn method (the clean draws, balanced_random, the filters, diversity, the cluster strata)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="only these (random, full, oracle and clean_random always run)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.random_draws < 2 or args.draws < 1:
        p.error("need --random-draws >= 2 (the validity checks use their spread) and --draws >= 1")
    judged = judged_kinds(args.defect_kinds)
    planted = set(judged) & set(args.defect_kinds)
    if not planted or planted == set(judged):
        p.error(f"--defect-kinds must plant some of {judged} and leave some out (both are judged)")
    if not 1 <= args.targets < args.families <= len(LANGUAGES):
        p.error(f"need 1 <= --targets < --families <= {len(LANGUAGES)} (non-target families are judged too)")
    return args


# ---------------------------------------------------------------------------- the pool


def codebooks(rng: random.Random, n_families: int) -> dict[str, dict[str, str]]:
    """{language: {word: code}}: a made-up code per word, distinct within a language, from syllables of
    the language's own two consonants (a tiny model learns a language's sounds, hardly a codebook: the
    sounds are what only that language's rows can teach)."""
    books = {}
    for f, lang in enumerate(LANGUAGES[:n_families]):
        syllables = [c + v for c in CONSONANTS[2 * f : 2 * f + 2] for v in VOWELS]
        codes: set[str] = set()
        while len(codes) < len(WORDS):
            codes.add("".join(rng.choice(syllables) for _ in range(3)))
        books[lang] = dict(zip(WORDS, rng.sample(sorted(codes), len(codes))))
    return books


def family_rows(books: dict[str, dict[str, str]]) -> list[dict]:
    rows = []
    for lang, book in books.items():
        for t, (question, answer) in enumerate(POOL_TEMPLATES):
            for word, code in book.items():
                rows.append(
                    {
                        "dataset": lang.lower(),
                        "id": f"{lang.lower()}_{t}_{word}",
                        "messages": [
                            {"role": "user", "content": question.format(lang=lang, word=word)},
                            {"role": "assistant", "content": answer.format(lang=lang, word=word, code=code)},
                        ],
                    }
                )
    return rows


def held_out_items(lang: str, book: dict[str, str]) -> list[dict]:
    question, answer = HELD_OUT_TEMPLATE
    return [
        {
            "dataset": lang.lower(),
            "id": f"{lang.lower()}_held_{word}",
            "messages": [
                {"role": "user", "content": question.format(lang=lang, word=word)},
                {"role": "assistant", "content": answer.format(code=code)},
            ],
        }
        for word, code in book.items()
    ]


def build_pool(args, seed: int, out: Path) -> dict:
    rng = random.Random(seed)
    books = codebooks(rng, args.families)
    rows = family_rows(books) + sample_rows(Path(args.data_dir), args.real_rows, seed)
    rng.shuffle(rows)
    families = {lang.lower(): book for lang, book in books.items()}

    def wrong_code(i: int, reply: str) -> str | None:
        book = families.get(rows[i]["dataset"])
        if book is None:
            return None
        right = next(code for code in book.values() if code in reply)
        return reply.replace(right, rng.choice([c for c in book.values() if c != right]))

    labels = plant_defects(
        random.Random(seed + 1),
        rows,
        args.defect_rate,
        args.defect_kinds,
        wrong_reply=wrong_code,
    )
    (out / "train").mkdir(parents=True, exist_ok=True)
    for dataset in sorted({r["dataset"] for r in rows}):
        with (out / "train" / f"{dataset}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["dataset"] == dataset)
    targets = LANGUAGES[: args.targets]
    (out / "targets").mkdir(exist_ok=True)
    held_out = {}
    for lang in LANGUAGES[: args.families]:
        items = held_out_items(lang, books[lang])
        random.Random(seed + 2).shuffle(items)
        if lang in targets:
            shown, items = items[: args.target_examples], items[args.target_examples :]
            with (out / "targets" / f"{lang.lower()}.jsonl").open("w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in shown)
        held_out[lang.lower()] = items
    kind = {label["id"]: label["defect"] or "clean" for label in labels}
    return {
        "rows": rows,
        "kind": kind,
        "clean": {i: k == "clean" for i, k in kind.items()},
        "planted_kinds": [kind for kind in judged_kinds(args.defect_kinds) if kind in args.defect_kinds],
        "targets": [lang.lower() for lang in targets],
        "held_out": held_out,
        "clean_replies": (clean_replies := clean_held_out_rows(args, seed, {r["id"] for r in rows})),
        "spoiled_replies": spoiled_replies(clean_replies, seed, judged_kinds(args.defect_kinds)),
    }


def clean_held_out_rows(args, seed: int, pool_ids: set[str]) -> list[dict]:
    """``--clean-rows`` real rows, unspoiled, that neither the pool nor the LM rows of the selector and
    the target hold (``tiny_lm``'s sample)."""
    seen = pool_ids | {r["id"] for r in lm_rows(seed)}
    candidates = sample_rows(Path(args.data_dir), 4 * args.clean_rows + len(seen), seed + 4099)
    rows = [r for r in candidates if r["id"] not in seen][: args.clean_rows]
    if len(rows) < args.clean_rows:
        raise SystemExit(f"--clean-rows {args.clean_rows}: only {len(rows)} real rows are outside the pool")
    return rows


# the kinds every finetune is judged on, planted or not (later held-out kinds only where planted)
PREFERENCE_KINDS = tuple(k for k in DEFECT_KINDS if k != "wrong_answer") + ("looped", "echo")


def judged_kinds(planted: list[str]) -> list[str]:
    """``PREFERENCE_KINDS`` and the ``planted`` kinds beyond them (not ``wrong_answer``: a tiny target
    cannot know which final answer is right), in that order."""
    return [*PREFERENCE_KINDS, *(k for k in planted if k not in PREFERENCE_KINDS and k != "wrong_answer")]


def spoiled_replies(rows: list[dict], seed: int, kinds: list[str]) -> dict[str, list[dict | None]]:
    """{kind: each of ``rows`` with its reply spoiled that way, or None where the kind does not apply}, for
    ``kinds`` (``judged_kinds``): the pool's and those no pool row has."""
    rng = random.Random(seed + 5003)
    replies = [r["messages"][-1]["content"] for r in rows]
    spoiled: dict[str, list[dict | None]] = {}
    for kind in kinds:
        spoiled[kind] = []
        for i, row in enumerate(rows):
            donor = replies[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)]
            reply = spoil(kind, replies[i], rng, donor, request=request_of(row))
            messages = [*row["messages"][:-1], {"role": "assistant", "content": reply}]
            spoiled[kind].append(
                {**row, "messages": messages}
                if applies(kind, replies[i], None) and reply != replies[i]
                else None
            )
    return spoiled


# ---------------------------------------------------------------------------- models and stages


def lm_rows(seed: int) -> list[dict]:
    return sample_rows(TRAIN_DIR, 1500, seed + 7919)


def tiny_lm(kind: str, seed: int, args, cache: Path) -> Path:
    """A tiny OLMoE (selector) or Llama (target), LM-pretrained on real rows the pool does not hold."""
    return lm_pretrained_tiny(kind, seed, lm_rows(seed), args.lm_steps, args.max_length, cache)


def run_stages(args, seed: int, selector: Path, out: Path) -> tuple[Path, dict[str, list[str]]]:
    """The product's stage 1 and stage 2 on the pool (``selection_quality.run_stages``: every score term
    stored), selecting by similarity to the target examples among all its rows, then again (the same
    score files) by ``selection.method=calibrated`` with the target examples as the trusted rows.
    Returns the stage-2 folder and those two selections' ids."""
    select_overrides = (
        "selection.exclude_training_rows=false",  # the target model never saw them: the whole pool
        "selection.method=similarity",
        f"selection.targets=[{out / 'targets'}]",
        "scoring.store_embeddings=true",
        # every NLL-based row measured as the default preset measures its NLLs (its base model's)
        f"scoring.nll_model={DEFAULT['scoring'].get('nll_model', 'stage1')}",
    )
    stage2_cfg, stage2 = run_stages_of_the_product(args, out, selector, out, seed, [], select_overrides)
    chosen = {"similarity": _selected_ids(stage2)}
    stage2_cfg.selection.targets, stage2_cfg.selection.trusted = None, [str(out / "targets")]
    chosen["calibrated"] = [r["id"] for r in reselect(stage2_cfg, "calibrated")]
    return stage2, chosen


def _selected_ids(stage2: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (stage2 / "selected.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- the methods


def selections(
    args, seed: int, pool: dict, stage2: Path, product: dict[str, list[str]]
) -> tuple[dict[str, list[list[str]]], list[list[dict]]]:
    """Every method's draws of ids (one unless the method is a seeded draw: ``--random-draws`` of random,
    ``--draws`` of the clean draws, ``balanced_random``, the filters, the diversity selections and the
    cluster strata): those computed here from the score files, and ``product``'s (the product's own
    similarity and calibrated selections); and per draw of the diversity selections, its clusters
    (``cluster_mix``)."""
    import pyarrow as pa

    from selectmoe.select.score import common_ngrams, row_score, score_of, score_terms, term_scales
    from selectmoe.select.topk import (
        above_dataset_thresholds,
        dataset_quotas,
        dataset_thresholds,
        diversity_select,
        frequent_replies,
        random_per_dataset_k,
        selection_size,
        with_reply_strata,
    )

    table = pq.read_table(
        stage2 / "scores",
        columns=[
            "id",
            "dataset",
            "layer_scores",
            "nll",
            "nll_without_prompt",
            "reply_redundancy",
            "reply_ngrams",
            "reply_hash",
            "routing",
            "n_scored_tokens",
        ],
    )
    ids = np.asarray(table["id"].to_pylist())
    datasets = np.asarray(table["dataset"].to_pylist())
    layer_scores = np.stack(table["layer_scores"].to_numpy(zero_copy_only=False))
    nll, unprompted = table["nll"].to_numpy(), table["nll_without_prompt"].to_numpy()
    redundancy = table["reply_redundancy"].to_numpy()
    ngrams = np.stack(table["reply_ngrams"].to_numpy(zero_copy_only=False))
    common = common_ngrams(ngrams, ScoringSection().common_ngram_share)  # the product's: every row is sampled
    former = GATES_PROMPT_GAIN["scoring"]
    gates_prompt_gain = row_score(
        layer_scores, nll, former["perplexity_weight"], unprompted, former["prompt_gain_weight"]
    )
    scales = term_scales(score_terms(layer_scores, nll, unprompted))
    filter_scores = {
        name: score_of(
            {
                "layer_scores": layer_scores,
                "nll": nll,
                "nll_without_prompt": unprompted,
                "reply_redundancy": redundancy,
                "reply_ngrams": ngrams,
            },
            ScoringSection(
                gate_weight=0.0,
                perplexity_weight=nll_weight,
                prompt_gain_weight=gain_weight,
                combine=combine,
                prompt_gain_cap=cap,
                redundancy_weight=redundancy_weight,
                redundancy_tolerance=tolerance,
                commonness_weight=commonness_weight,
                commonness_tolerance=commonness_tolerance,
            ),
            scales,
            common,
        )  # fmt: skip
        for name, (
            nll_weight,
            gain_weight,
            combine,
            cap,
            redundancy_weight,
            tolerance,
            commonness_weight,
            commonness_tolerance,
        ) in FILTERED_RANDOM_RECIPES.items()
    }
    k = selection_size(len(ids), args.percentage)
    draws = range(args.draws)

    def best(score: np.ndarray, among: np.ndarray | None = None) -> list[str]:
        order = sorted(range(len(ids)), key=lambda i: (-score[i], ids[i]))
        if among is not None:
            order = [i for i in order if among[i]]
        return [str(ids[i]) for i in order[:k]]

    chosen = {
        "random": [
            random.Random(seed * 1000 + d).sample(sorted(ids.tolist()), k) for d in range(args.random_draws)
        ]
    }
    chosen["full"] = [sorted(ids.tolist())]
    target = np.isin(datasets, pool["targets"]) & np.asarray([pool["clean"][i] for i in ids])
    chosen["oracle"] = [random.Random(seed).sample(sorted(ids[target].tolist()), min(k, int(target.sum())))]
    clean = sorted(i for i in ids.tolist() if pool["clean"][i])
    chosen["clean_random"] = [
        random.Random(draw_seed(seed + 1, d)).sample(clean, min(k, len(clean))) for d in draws
    ]
    chosen["perplexity"] = [best(-nll)]
    chosen["gates"] = [best(layer_scores.mean(axis=1))]
    chosen["gates_prompt_gain"] = [best(gates_prompt_gain)]

    def quotas_of(strata: np.ndarray) -> dict[str, int]:
        return dataset_quotas({s: int((strata == s).sum()) for s in set(strata)}, k, None)

    quotas = quotas_of(datasets)
    chosen["gates_prompt_gain_balanced"] = [
        [i for d in sorted(quotas) for i in best(gates_prompt_gain, datasets == d)[: quotas[d]]]
    ]

    def filtered_random(
        score: np.ndarray | None,
        d: int,
        among: np.ndarray | None = None,
        strata: np.ndarray = datasets,
        keep_fraction: float = DEFAULT["selection"]["keep_fraction"],
    ) -> list[str]:
        """``selection.method=filtered_random``'s draw: quotas of each dataset's best ``keep_fraction`` by
        ``score`` (of all its rows when ``score`` is None: ``balanced_random``; of its ``among`` rows when
        given); ``strata`` in place of the datasets: the pool as one dataset, routing clusters, length
        quarters or reply strata (``selection.strata=reply``'s labels; its quotas are shared out over every
        stratum at once, the product's per dataset first, so a dataset's count may differ by a row)."""
        rows = np.ones(len(ids), dtype=bool) if among is None else among
        scored = pa.table(
            {
                "id": ids[rows],
                "dataset": strata[rows],
                "score": np.zeros(int(rows.sum())) if score is None else score[rows],
            }
        )
        kept = [scored]
        if score is not None:
            thresholds = dataset_thresholds({s: score[strata == s] for s in set(strata)}, keep_fraction)
            kept = above_dataset_thresholds(kept, thresholds)
        return random_per_dataset_k(kept, quotas_of(strata), draw_seed(seed, d))["id"].to_pylist()

    chosen["balanced_random"] = [filtered_random(None, d) for d in draws]
    clean_rows = np.asarray([pool["clean"][i] for i in ids])
    chosen["clean_balanced_random"] = [filtered_random(None, d, clean_rows) for d in draws]
    chosen.update({name: [filtered_random(score, d) for d in draws] for name, score in filter_scores.items()})

    def diverse(score: np.ndarray, d: int) -> tuple[list[str], np.ndarray]:
        """``selection.method=diversity``'s choice by ``score`` and its cluster labels, its k-means seeded
        by the draw (the clusters do not depend on the score)."""
        scored = pa.table({"id": ids, "dataset": datasets, "score": score, "routing": table["routing"]})
        clustering = ClusteringParams()
        picked, labels = diversity_select(scored, k, clustering.k, clustering.max_iters, draw_seed(seed, d))
        return picked["id"].to_pylist(), labels

    default_score = filter_scores[default_score_method()]
    diversity = [diverse(default_score, d) for d in draws]
    chosen["diversity"] = [picked for picked, _ in diversity]
    clusters = [cluster_mix(pool, ids, labels) for _, labels in diversity]
    chosen["diversity_random_order"] = [
        diverse(np.random.default_rng(draw_seed(seed, d)).random(len(ids)), d)[0] for d in draws
    ]
    # corpora without dataset labels: the pool as one dataset, or the draw's routing clusters as strata
    pooled = np.full(len(ids), "pool")
    chosen["filtered_random_pooled"] = [filtered_random(default_score, d, strata=pooled) for d in draws]
    cluster_strata = [labels.astype(str) for _, labels in diversity]
    chosen["filtered_random_by_cluster"] = [
        filtered_random(default_score, d, strata=cluster_strata[d]) for d in draws
    ]
    chosen["cluster_balanced_random"] = [filtered_random(None, d, strata=cluster_strata[d]) for d in draws]
    # each dataset cut into quarters by reply length: the filter's better half and the quotas per quarter
    length_strata = length_quarters(ids, datasets, table["n_scored_tokens"].to_numpy())
    chosen["filtered_random_by_length"] = [
        filtered_random(default_score, d, strata=length_strata) for d in draws
    ]
    # a milder filter: each dataset keeps more of its rows, so fewer clean ones are left for being unlikely
    for keep in KEEP_FRACTIONS:
        chosen[f"filtered_random_keep{round(100 * keep)}"] = [
            filtered_random(default_score, d, keep_fraction=keep) for d in draws
        ]
    # selection.strata=reply: each dataset's frequent replies one stratum each, the rest one more
    frequent = frequent_replies(datasets.tolist(), table["reply_hash"].to_pylist())
    reply_strata = np.asarray(with_reply_strata(table.select(["dataset", "reply_hash"]), frequent)["dataset"])
    chosen["filtered_random_by_reply"] = [
        filtered_random(default_score, d, strata=reply_strata) for d in draws
    ]
    without_nll = filter_scores["filtered_random_raw_prompt_gain_redundancy"]
    chosen["filtered_random_by_reply_without_nll"] = [
        filtered_random(without_nll, d, strata=reply_strata) for d in draws
    ]
    return {**chosen, **{name: [ids] for name, ids in product.items()}}, clusters


def length_quarters(ids: np.ndarray, datasets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each row's dataset and the quarter of that dataset's rows by scored reply tokens it falls in
    (``DATASET/q0`` the shortest; ties by id)."""
    strata = np.empty(len(ids), dtype=object)
    for dataset in np.unique(datasets):
        rows = np.flatnonzero(datasets == dataset)
        order = sorted(rows, key=lambda i: (lengths[i], ids[i]))
        for rank, i in enumerate(order):
            strata[i] = f"{dataset}/q{4 * rank // len(order)}"
    return strata.astype(str)


def cluster_mix(pool: dict, ids: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Each cluster's rows, family rows and rows of each kind (``clean`` or a defect kind), largest first:
    round-robin takes as many rows from a small cluster as from a large one."""
    family = {r["id"] for r in pool["rows"] if r["dataset"] in pool["held_out"]}
    mix = []
    for c in np.unique(labels):
        members = ids[labels == c].tolist()
        mix.append(
            {
                "rows": len(members),
                "family_rows": sum(i in family for i in members),
                "kinds": dict(Counter(pool["kind"][i] for i in members)),
            }
        )
    return sorted(mix, key=lambda cluster: -cluster["rows"])


def draw_seed(seed: int, draw: int) -> int:
    """The seed of a method's ``draw``-th draw; the first is ``seed`` itself (as before ``--draws``)."""
    return seed + 1_000_003 * draw


# ---------------------------------------------------------------------------- finetune and judge


def finetune_and_judge(args, seed: int, target: Path, rows: list[dict], judged_on: dict) -> dict:
    """Train every weight of the tiny target on ``rows`` (loss on the replies), then judge it on
    ``judged_on``: ``nll``, its mean NLL of the right answer on each group of ``held_out`` rows (each
    family's held-out items, the clean replies), and ``preference``, per kind of ``spoiled`` reply, how
    much higher its per-token NLL of the spoiled reply is than of the clean one (``margin``) and in what
    share of the pairs (``accuracy``): lm-eval's multiple-choice comparison of two continuations, per
    token."""
    from transformers import AutoModelForCausalLM

    from selectmoe.data.collate import collate
    from selectmoe.data.template import encode_batch, ensure_pad_token, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = ensure_pad_token(load_tokenizer(str(target)))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    encoded = [
        e
        for e in encode_batch(
            [r["messages"] for r in rows], tokenizer, max_seq_length=args.finetune_max_length
        )
        if isinstance(e, dict)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    for _ in range(args.steps):  # epochs of a seeded shuffle, as many as the steps take
        if len(order) < args.batch:
            order += rng.sample(range(len(encoded)), len(encoded))
        batch, order = [encoded[i] for i in order[: args.batch]], order[args.batch :]
        model(**collate(batch, tokenizer.pad_token_id, torch.device("cpu"))).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    scored = {
        group: reply_nlls(model, tokenizer, items, args.max_length)
        for group, items in judged_on["held_out"].items()
    }
    clean_nll, clean_whole = scored[CLEAN]
    preference = {}
    for kind, versions in judged_on["spoiled"].items():
        present = [i for i, row in enumerate(versions) if row is not None]
        nll, whole = reply_nlls(model, tokenizer, [versions[i] for i in present], args.max_length)
        paired = whole & clean_whole[present]  # both replies scored whole
        gap = nll[paired] - clean_nll[present][paired]
        if len(gap):  # a kind none of whose pairs fits max_length whole is left out
            preference[kind] = {
                "margin": float(gap.mean()),
                "accuracy": float((gap > 0).mean()),
                "pairs": len(gap),
            }
    # rows the template rejects are left out of the means; rows it cuts keep their scored part
    return {
        "nll": {group: float(np.nanmean(nll)) for group, (nll, _) in scored.items()},
        "preference": preference,
    }


def reply_nlls(model, tokenizer, rows: list[dict], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's mean NLL of its reply (NaN where the template rejects the row) by the product's scoring
    pass on a plain LM, and whether the row fits ``max_length`` whole."""
    from selectmoe.data.template import encode_batch
    from selectmoe.select.score import ScorePasses, score_batch

    encoded = encode_batch([r["messages"] for r in rows], tokenizer, max_seq_length=max_length)
    kept = [i for i, e in enumerate(encoded) if isinstance(e, dict)]
    nll, whole = np.full(len(rows), np.nan), np.zeros(len(rows), dtype=bool)
    nll_only = ScorePasses(gates=False, nll=True)
    for start in range(0, len(kept), 32):
        chunk = kept[start : start + 32]
        nll[chunk] = score_batch(model, [encoded[i] for i in chunk], nll_only, tokenizer.pad_token_id)["nll"]
    whole[kept] = [encoded[i]["n_tokens_before_truncation"] <= max_length for i in kept]
    return nll, whole


def cached_finetune(args, seed: int, target: Path, rows: list[dict], judged_on: dict, cache: Path) -> dict:
    """``finetune_and_judge``, cached by everything it reads: a rerun with other ``--methods`` does not
    train the methods that always run again."""
    key = hash_dict(
        {
            "seed": seed,
            "target": str(target),
            "rows": rows,
            **judged_on,
            **{
                k: getattr(args, k)
                for k in ("steps", "batch", "learning_rate", "finetune_max_length", "max_length")
            },
        }
    )
    path = cache / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = finetune_and_judge(args, seed, target, rows, judged_on)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def run_seed(args, seed: int, out: Path) -> dict:
    pool = build_pool(args, seed, out)
    cache = Path(args.work_dir) / "models"
    selector, target = tiny_lm("olmoe", seed, args, cache), tiny_lm("llama", seed, args, cache)
    stage2, product = run_stages(args, seed, selector, out)
    by_id = {r["id"]: r for r in pool["rows"]}
    judged_on = {
        "held_out": {**pool["held_out"], CLEAN: pool["clean_replies"]},
        "spoiled": pool["spoiled_replies"],
    }
    results = {}
    common = commonest_replies(pool, by_id)
    chosen, clusters = selections(args, seed, pool, stage2, product)
    for method, draws in chosen.items():
        if args.methods and method not in (*args.methods, *ALWAYS_RUN):
            continue
        judged = []
        for ids in draws:
            started = time.time()
            rows = [by_id[i] for i in ids]
            judged_by = cached_finetune(args, seed, target, rows, judged_on, out / "finetunes")
            print(f"  finetuned on {method} ({len(ids)} rows) in {time.time() - started:.0f} s", flush=True)
            judged.append(judge(pool, by_id, ids, judged_by, common))
        results[method] = {
            **{
                key: statistics.mean(j[key] for j in judged)
                for key in MEASURES + ("rows", "target_rows", "family_rows", "clean_share")
            },
            **{
                key: statistics.mean(j[key] for j in judged if j[key] is not None)
                if any(j[key] is not None for j in judged)
                else None
                for key in KEPT_CLEAN_REAL
            },
            **{
                f"{key}_std": statistics.stdev(j[key] for j in judged) if len(judged) > 1 else 0.0
                for key in MEASURES
            },
            "draws": judged,
        }
    random_draws = results["random"]
    return {
        "seed": seed,
        "targets": pool["targets"],
        "pool_rows": len(pool["rows"]),
        "pool_kinds": terms_per_kind(pool, stage2),
        "diversity_clusters": clusters,  # per draw
        "clean_rows": len(pool["clean_replies"]),  # before the template drops rows too long for it
        "methods": results,
        "valid": all(
            random_draws["target_nll"] - results[m]["target_nll"] > 2 * random_draws["target_nll_std"]
            for m in ("oracle", "full")
        ),
        "clean_valid": random_draws["clean_nll"] - results["clean_random"]["clean_nll"]
        > 2 * random_draws["clean_nll_std"],
    }


def terms_per_kind(pool: dict, stage2: Path) -> dict[str, dict]:
    """Per kind of the pool's scored rows (``clean`` or a defect kind): how many, their mean NLL and prompt
    gain in nats per reply token as stage 2 scored them, over all its rows and over its real rows (the
    families' rows are short and made up), and their mean reply redundancy and commonness: what a filter by
    those terms sees."""
    from selectmoe.select.score import common_ngrams, reply_commonness

    table = pq.read_table(
        stage2 / "scores",
        columns=["id", "dataset", "nll", "nll_without_prompt", "reply_redundancy", "reply_ngrams"],
    ).to_pydict()
    ngrams = np.stack([np.asarray(row, dtype=np.uint32) for row in table["reply_ngrams"]])
    commonness = reply_commonness(ngrams, common_ngrams(ngrams, ScoringSection().common_ngram_share))
    kinds = np.asarray([pool["kind"][i] for i in table["id"]])
    real = ~np.isin(table["dataset"], list(pool["held_out"]))
    nll, unprompted = np.asarray(table["nll"]), np.asarray(table["nll_without_prompt"])
    redundancy = np.asarray(table["reply_redundancy"])
    terms = {}
    for kind in sorted(set(kinds.tolist())):
        rows, real_rows = kinds == kind, (kinds == kind) & real
        terms[kind] = {
            "rows": int(rows.sum()),
            "nll": float(nll[rows].mean()),
            "prompt_gain": float((unprompted - nll)[rows].mean()),
            "reply_redundancy": float(redundancy[rows].mean()),
            "reply_commonness": float(commonness[rows].mean()),
            "real_rows": int(real_rows.sum()),
            "real_nll": float(nll[real_rows].mean()) if real_rows.any() else None,
            "real_prompt_gain": float((unprompted - nll)[real_rows].mean()) if real_rows.any() else None,
        }
    return terms


def keep_rates(per_seed: list[dict], method: str) -> dict[str, float]:
    """Per kind of row, the share of the method's selections it makes up over its share of the pool,
    averaged over draws and seeds: 1 keeps it as often as a random draw, 0 never."""
    rates: dict[str, list[float]] = {}
    for s in per_seed:
        pool = s["pool_kinds"]
        pool_rows = sum(kind["rows"] for kind in pool.values())
        for draw in (d for d in s["methods"][method]["draws"] if d["rows"]):
            for kind, n in pool.items():
                share = draw["kind_counts"].get(kind, 0) / draw["rows"]
                rates.setdefault(kind, []).append(share / (n["rows"] / pool_rows))
    return {kind: statistics.mean(values) for kind, values in rates.items()}


COMMON_REPLIES = 6  # per real dataset, the replies its clean rows give most often (BBH's "(B)", "Yes", ...)
KEPT_CLEAN_REAL = ("clean_real_reply_chars", "common_reply_share")


def commonest_replies(pool: dict, by_id: dict[str, dict]) -> dict[str, set[str]]:
    """Per real dataset of the pool, the ``COMMON_REPLIES`` replies its clean rows give most often."""
    counts: dict[str, Counter] = {}
    for i, row in by_id.items():
        if pool["clean"][i] and row["dataset"] not in pool["held_out"]:
            counts.setdefault(row["dataset"], Counter())[row["messages"][-1]["content"]] += 1
    return {dataset: {reply for reply, _ in c.most_common(COMMON_REPLIES)} for dataset, c in counts.items()}


def judge(
    pool: dict, by_id: dict[str, dict], ids: list[str], judged_by: dict, common: dict[str, set[str]]
) -> dict:
    """One finetune's measures (``MEASURES``) and what its selection holds, with what its clean real rows
    are like (``KEPT_CLEAN_REAL``: their mean reply length in characters, and the share of them whose reply
    is one of their dataset's commonest, ``commonest_replies``; None without such rows): a filter by
    likelihood can keep the short, frequent answers of a dataset and leave its rarer ones."""
    kept = [by_id[i] for i in ids if pool["clean"][i] and by_id[i]["dataset"] in common]
    replies = [(row["dataset"], row["messages"][-1]["content"]) for row in kept]
    families = {f: v for f, v in judged_by["nll"].items() if f != CLEAN}
    preference = judged_by["preference"]
    planted = [kind for kind in pool["planted_kinds"] if kind in preference]
    absent = [kind for kind in preference if kind not in pool["planted_kinds"]]
    return {
        "target_nll": statistics.mean(families[f] for f in pool["targets"]),
        "other_nll": statistics.mean(v for f, v in families.items() if f not in pool["targets"]),
        "family_nll": statistics.mean(families.values()),
        "clean_nll": judged_by["nll"][CLEAN],
        "junk_margin": statistics.mean(preference[kind]["margin"] for kind in planted),
        "junk_accuracy": statistics.mean(preference[kind]["accuracy"] for kind in planted),
        "absent_kinds_junk_margin": statistics.mean(preference[kind]["margin"] for kind in absent),
        "rows": len(ids),
        "target_rows": sum(by_id[i]["dataset"] in pool["targets"] for i in ids),
        "family_rows": sum(by_id[i]["dataset"] in pool["held_out"] for i in ids),
        "clean_share": sum(pool["clean"][i] for i in ids) / max(len(ids), 1),
        "clean_real_reply_chars": statistics.mean(len(reply) for _, reply in replies) if replies else None,
        "common_reply_share": statistics.mean(reply in common[d] for d, reply in replies)
        if replies
        else None,
        "kind_counts": dict(Counter(pool["kind"][i] for i in ids)),
        "nll_per_family": families,
        "preference_per_kind": preference,
    }


# ---------------------------------------------------------------------------- report


def margin(per_seed: list[dict], method: str, baseline: str, key: str) -> tuple[float, float, int]:
    """How much better ``method``'s mean ``key`` is than ``baseline``'s (lower NLL, higher preference),
    averaged over the seeds, its standard error (each seed's from the spread of both methods' draws; a
    method drawn once contributes no spread of its own), and in how many seeds it is positive."""
    sign = 1 if key in HIGHER_IS_BETTER else -1
    margins, variances = [], []
    for s in per_seed:
        m, b = s["methods"][method], s["methods"][baseline]
        margins.append(sign * (m[key] - b[key]))
        variances.append(sum(r[f"{key}_std"] ** 2 / len(r["draws"]) for r in (m, b)))
    return statistics.mean(margins), math.sqrt(sum(variances)) / len(per_seed), sum(x > 0 for x in margins)


def summarise(per_seed: list[dict]) -> dict:
    rows = {}
    for method in per_seed[0]["methods"]:
        runs = [s["methods"][method] for s in per_seed]
        row = {
            "draws": len(runs[0]["draws"]),
            **{
                f"{key}_mean": statistics.mean(r[key] for r in runs)
                for key in MEASURES + ("target_rows", "family_rows", "clean_share")
            },
            **{
                f"{key}_mean": statistics.mean(r[key] for r in runs if r[key] is not None)
                if any(r[key] is not None for r in runs)
                else None
                for key in KEPT_CLEAN_REAL
            },
        }
        for baseline in ("random", "balanced_random"):
            if baseline in per_seed[0]["methods"] and method != baseline:
                for key in MEASURES:
                    value, se, positive = margin(per_seed, method, baseline, key)
                    row[f"{key}_margin_vs_{baseline}"] = {"mean": value, "se": se, "beats_in_seeds": positive}
        row["keep_rate_per_kind"] = keep_rates(per_seed, method)
        rows[method] = row
    junk = rows["clean_balanced_random"]["junk_margin_margin_vs_balanced_random"]
    return {
        "seeds": len(per_seed),
        "valid_in_every_seed": all(s["valid"] for s in per_seed),
        "clean_valid_in_every_seed": all(s["clean_valid"] for s in per_seed),
        # the preference measure can judge a junk filter only if a perfect one (the same draws with every
        # spoiled row replaced by a clean one) clearly wins on it
        "junk_measure_valid": junk["mean"] > 2 * junk["se"] > 0,
        "default": default_method(),
        "default_score": default_score_method(),  # its score, the dataset strata
        "methods": rows,
        "diversity_clusters": cluster_summary(per_seed),
    }


def cluster_summary(per_seed: list[dict]) -> dict:
    """Over every draw of the diversity selections: how many clusters are at least 90% family rows, the
    share of the family rows they hold, their mean size against the other clusters', and per defect kind
    the clusters it is the majority of (count, mean size) and their share of its rows."""
    draws = [draw for s in per_seed for draw in s["diversity_clusters"]]
    if not draws:
        return {}
    family, family_rows, family_size, other_size, by_kind = [], [], [], [], {}
    for draw in draws:
        is_family = [c["family_rows"] >= 0.9 * c["rows"] for c in draw]
        mostly_family = [c for c, f in zip(draw, is_family) if f]
        family.append(len(mostly_family))
        family_rows.append(sum(c["family_rows"] for c in mostly_family) / sum(c["family_rows"] for c in draw))
        family_size += [c["rows"] for c in mostly_family]
        other_size += [c["rows"] for c, f in zip(draw, is_family) if not f]
        totals = Counter()
        for c in draw:
            totals.update(c["kinds"])
        for kind in totals:
            if kind == "clean":
                continue
            majority = [c for c in draw if c["kinds"].get(kind, 0) > c["rows"] / 2]
            entry = by_kind.setdefault(kind, {"clusters": [], "sizes": [], "rows_in_them": []})
            entry["clusters"].append(len(majority))
            entry["sizes"] += [c["rows"] for c in majority]
            entry["rows_in_them"].append(sum(c["kinds"][kind] for c in majority) / totals[kind])
    return {
        "draws": len(draws),
        "clusters": statistics.mean(len(d) for d in draws),
        "mostly_family_clusters": statistics.mean(family),
        "family_rows_in_them": statistics.mean(family_rows),
        "their_mean_rows": statistics.mean(family_size) if family_size else None,
        "other_clusters_mean_rows": statistics.mean(other_size) if other_size else None,
        "kind_majority_clusters": {
            kind: {
                "clusters": statistics.mean(v["clusters"]),
                "mean_rows": statistics.mean(v["sizes"]) if v["sizes"] else None,
                "kind_rows_in_them": statistics.mean(v["rows_in_them"]),
            }
            for kind, v in sorted(by_kind.items())
        },
    }


def print_seed(result: dict) -> None:
    r = result["methods"]["random"]
    print(
        f"\nseed {result['seed']} ({result['seconds']} s, pool {result['pool_rows']} rows, targets {result['targets']}): "
        f"random target NLL {r['target_nll']:.3f} +- {r['target_nll_std']:.3f}; proxy valid: {result['valid']}; "
        f"random clean-reply NLL {r['clean_nll']:.3f} +- {r['clean_nll_std']:.3f}; valid: {result['clean_valid']}"
    )
    print(
        "  pool rows by kind (mean NLL / prompt gain in nats per reply token, all rows; real rows; "
        "reply redundancy / commonness): "
        + ", ".join(
            f"{k} {v['rows']} ({v['nll']:.2f} / {v['prompt_gain']:+.2f}; "
            + (f"{v['real_nll']:.2f} / {v['real_prompt_gain']:+.2f}; " if v["real_rows"] else "-; ")
            + f"{v['reply_redundancy']:.2f} / {v.get('reply_commonness', float('nan')):.2f})"
            for k, v in result["pool_kinds"].items()
        )
    )
    for method, v in result["methods"].items():
        print(
            f"  {method:45s} draws {len(v['draws'])}  target NLL {v['target_nll']:.3f}  all families "
            f"{v['family_nll']:.3f}  clean replies {v['clean_nll']:.3f}  junk margin {v['junk_margin']:+.3f} "
            f"(kinds not in the pool {v['absent_kinds_junk_margin']:+.3f}, accuracy {v['junk_accuracy']:.3f})  rows {v['rows']:5.0f}  "
            f"target rows {v['target_rows']:5.1f}  family rows {v['family_rows']:5.1f}  clean {v['clean_share']:.2f}"
        )


def print_summary(summary: dict) -> None:
    print(
        f"\n{summary['seeds']} seeds; proxy valid in every seed: {summary['valid_in_every_seed']}; "
        f"clean-reply measure valid in every seed: {summary['clean_valid_in_every_seed']}; "
        f"junk preference measure valid: {summary['junk_measure_valid']}; "
        f"the default preset is {summary['default']}; margins say how much better than the random draws' "
        "mean (lower NLL, higher junk margin), +- a standard error from the draws' spread"
    )
    columns = {
        "target NLL margin": "target_nll_margin_vs_random",
        "all-family NLL margin": "family_nll_margin_vs_random",
        "clean-reply NLL margin": "clean_nll_margin_vs_random",
        "junk margin vs random": "junk_margin_margin_vs_random",
        "junk margin vs balanced_random": "junk_margin_margin_vs_balanced_random",
        "junk margin of kinds not in the pool vs balanced_random": "absent_kinds_junk_margin_margin_vs_balanced_random",
    }
    print(
        "| method | draws | target NLL | beats random in seeds | "
        + " | ".join(columns)
        + " | junk margin | junk accuracy | clean share | target rows | family rows |"
    )
    print("|---|---:|---:|---:|" + "---:|" * (len(columns) + 5))

    def shown(row: dict, key: str) -> str:
        m = row.get(key)
        return f"{m['mean']:+.3f} +- {m['se']:.3f}" if m else ""

    for method, v in summary["methods"].items():
        vs_random = v.get("target_nll_margin_vs_random")
        beats = f"{vs_random['beats_in_seeds']}/{summary['seeds']}" if vs_random else ""
        print(
            f"| {method} | {v['draws']} | {v['target_nll_mean']:.3f} | {beats} | "
            + " | ".join(shown(v, key) for key in columns.values())
            + f" | {v['junk_margin_mean']:+.3f} | {v['junk_accuracy_mean']:.3f} | {v['clean_share_mean']:.2f} "
            f"| {v['target_rows_mean']:.1f} | {v['family_rows_mean']:.1f} |"
        )
    kinds = list(next(iter(summary["methods"].values()))["keep_rate_per_kind"])
    print(
        "\nHow often each kind of row is kept (its share of the selection over its share of the pool; 1 = as a "
        "random draw)\n| method | " + " | ".join(kinds) + " |\n|---|" + "---:|" * len(kinds)
    )
    for method, v in summary["methods"].items():
        print(f"| {method} | " + " | ".join(f"{v['keep_rate_per_kind'][k]:.2f}" for k in kinds) + " |")
    print(
        "\nThe selection's clean real rows: mean reply characters, and the share whose reply is one of their "
        f"dataset's {COMMON_REPLIES} commonest clean replies in the pool\n| method | reply chars | commonest replies |"
        "\n|---|---:|---:|"
    )
    for method, v in summary["methods"].items():
        chars, share = v["clean_real_reply_chars_mean"], v["common_reply_share_mean"]
        if chars is not None:
            print(f"| {method} | {chars:.1f} | {share:.2f} |")
    clusters = summary["diversity_clusters"]
    if clusters:
        print(
            f"\nThe diversity selections' clusters (mean of {clusters['draws']} draws): "
            f"{clusters['mostly_family_clusters']:.1f} of {clusters['clusters']:.0f} are at least 90% family rows, "
            f"hold {clusters['family_rows_in_them']:.0%} of them and have {clusters['their_mean_rows'] or 0:.0f} "
            f"rows on average, the others {clusters['other_clusters_mean_rows'] or 0:.0f}; clusters a defect kind "
            "is the majority of (count, mean rows, share of its rows): "
            + ", ".join(
                f"{kind} {v['clusters']:.1f} ({v['mean_rows'] or 0:.0f}, {v['kind_rows_in_them']:.0%})"
                for kind, v in clusters["kind_majority_clusters"].items()
            )
        )


if __name__ == "__main__":
    sys.exit(main())
