"""Generate the two small tasks of the multi-adapter example (beside ``people_json``).

- ``dates_iso``: a date written in words -> the same date in ISO 8601 (``2021-03-07``).
  User message: ``Write the date in ISO 8601: <date>``. Eight ways of writing a date, two of
  them only in test; test years never occur in train.
- ``review_sentiment``: a short product review -> ``positive`` or ``negative`` (one word).
  User message: ``Is this review positive or negative? <review>``. Reviews are built from a
  product, an opinion phrase and a detail; the test split uses products and opinion phrases
  that never occur in train.

Each row is ``{"messages": [user, assistant]}``. Standard library only, byte-for-byte
deterministic for a given ``--seed``::

    python3 data/make_tasks.py        # writes data/{dates_iso,review_sentiment}/{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
from pathlib import Path

DATE_PROMPT = "Write the date in ISO 8601: "
SENTIMENT_PROMPT = "Is this review positive or negative? "

MONTHS = list(calendar.month_name)[1:]


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


DATE_TEMPLATES_TRAIN = [
    lambda d, m, y: f"{MONTHS[m - 1]} {d}, {y}",
    lambda d, m, y: f"{d} {MONTHS[m - 1]} {y}",
    lambda d, m, y: f"the {_ordinal(d)} of {MONTHS[m - 1]}, {y}",
    lambda d, m, y: f"{MONTHS[m - 1][:3]} {d} {y}",
    lambda d, m, y: f"{y}, {MONTHS[m - 1]} {d}",
    lambda d, m, y: f"{MONTHS[m - 1]} {_ordinal(d)} {y}",
]
DATE_TEMPLATES_TEST = [
    lambda d, m, y: f"{d} {MONTHS[m - 1][:3]}. {y}",
    lambda d, m, y: f"{MONTHS[m - 1]} the {_ordinal(d)}, {y}",
]
TRAIN_YEARS = [y for y in range(1950, 2040) if y % 5 != 2]
TEST_YEARS = [y for y in range(1950, 2040) if y % 5 == 2]


def date_rows(rng: random.Random, count: int, templates, years) -> list[dict]:
    rows = []
    for i in range(count):
        year, month = rng.choice(years), rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        text = templates[i % len(templates)](day, month, year)
        rows.append(_chat(DATE_PROMPT + text, f"{year:04d}-{month:02d}-{day:02d}"))
    return rows


PRODUCTS_TRAIN = [
    "blender",
    "backpack",
    "desk lamp",
    "kettle",
    "phone case",
    "rain jacket",
    "office chair",
    "coffee grinder",
    "tent",
    "keyboard",
    "frying pan",
    "water bottle",
    "hair dryer",
    "novel",
    "board game",
    "yoga mat",
    "toaster",
    "headphones",
    "umbrella",
    "bike helmet",
]
PRODUCTS_TEST = ["suitcase", "alarm clock", "garden hose", "winter coat", "printer"]
OPINIONS_TRAIN = {
    "positive": [
        "works perfectly",
        "is excellent value",
        "exceeded my expectations",
        "is sturdy and well made",
        "I love it",
        "does exactly what it promises",
        "is a pleasure to use",
        "arrived quickly and works great",
        "is the best purchase I made this year",
        "feels premium",
    ],
    "negative": [
        "broke after two days",
        "is a waste of money",
        "stopped working within a week",
        "feels cheap and flimsy",
        "I regret buying it",
        "does not do what it promises",
        "is a pain to use",
        "arrived damaged",
        "is the worst purchase I made this year",
        "fell apart quickly",
    ],
}
OPINIONS_TEST = {
    "positive": ["is fantastic", "I would happily buy it again", "is really reliable"],
    "negative": ["is terrible", "I want a refund", "is really unreliable"],
}
DETAILS = [
    "",
    " I use it every day.",
    " Bought it as a gift.",
    " The colour is as pictured.",
    " Delivery took a week.",
    " My second one from this brand.",
    " Used it on a trip.",
]
REVIEW_TEMPLATES = [
    lambda product, opinion: f"This {product} {opinion}.",
    lambda product, opinion: f"The {product} {opinion}.",
    lambda product, opinion: f"{opinion[0].upper() + opinion[1:]}, this {product}.",
    lambda product, opinion: f"Honestly, the {product} {opinion}.",
]


def review_rows(rng: random.Random, count: int, products, opinions) -> list[dict]:
    rows = []
    for i in range(count):
        label = ("positive", "negative")[i % 2]
        opinion = rng.choice(opinions[label])
        product = rng.choice(products)
        review = rng.choice(REVIEW_TEMPLATES)(product, opinion)
        if opinion.startswith("I "):  # "I love it" reads as a sentence of its own
            review = f"{opinion[0].upper() + opinion[1:]}: the {product}."
        rows.append(_chat(SENTIMENT_PROMPT + review + rng.choice(DETAILS), label))
    return rows


def _chat(user: str, assistant: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


def _write(folder: Path, train: list[dict], test: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(folder / f"{name}.jsonl", "w", encoding="ascii", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=160, help="rows per task (default: 160)")
    parser.add_argument("--test", type=int, default=24, help="rows per task (default: 24)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    _write(
        args.out / "dates_iso",
        date_rows(rng, args.train, DATE_TEMPLATES_TRAIN, TRAIN_YEARS),
        date_rows(rng, args.test, DATE_TEMPLATES_TRAIN[:2] + DATE_TEMPLATES_TEST, TEST_YEARS),
    )
    _write(
        args.out / "review_sentiment",
        review_rows(rng, args.train, PRODUCTS_TRAIN, OPINIONS_TRAIN),
        review_rows(rng, args.test, PRODUCTS_TEST, OPINIONS_TEST),
    )


if __name__ == "__main__":
    main()
