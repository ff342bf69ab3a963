"""Generate the `people_json` dataset: short English sentence about a person -> one JSON object.

Each row is a chat example::

    {"messages": [
        {"role": "user", "content": "Extract the person as JSON: Maria Lopez, a 34-year-old nurse, lives in Porto."},
        {"role": "assistant", "content": "{\"name\": \"Maria Lopez\", \"age\": 34, \"city\": \"Porto\", \"job\": \"nurse\"}"}
    ]}

The answer is always ``json.dumps({"name", "age", "city", "job"}, ensure_ascii=False)``: one
line, keys in that fixed order, ``age`` an int, ``job`` the bare occupation (no article, no
"retired").

The test split is built to measure the *format* on unseen inputs, not memorisation:
every test full name is a first/last combination that never occurs in train, some test
rows use sentence templates that never occur in train, and some use cities that never
occur in train. Standard library only, deterministic for a given ``--seed``.

Regenerate with::

    python3 data/make_people_json.py            # writes data/people_json/{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PROMPT_PREFIX = "Extract the person as JSON: "
MAX_ANSWER_CHARS = 90

FIRST_NAMES = [
    # Europe / the Americas
    "Maria", "Lucas", "Sofia", "Mateo", "Elena", "Jonas", "Ingrid", "Pierre", "Chloe", "Marco",
    "Giulia", "Liam", "Emma", "Noah", "Olivia", "Tomasz", "Katarzyna", "Dmitri", "Anya", "Sean",
    "Aoife", "Lars", "Freya", "Diego", "Camila",
    # Africa / Middle East
    "Amara", "Kwame", "Chidi", "Zanele", "Thabo", "Fatima", "Omar", "Layla", "Youssef", "Nadia",
    "Tariq", "Amina", "Kofi",
    # South / East / Southeast Asia, Oceania
    "Priya", "Arjun", "Ananya", "Rohan", "Aisha", "Wei", "Mei", "Hiroshi", "Yuki", "Kenji",
    "Sakura", "Minjun", "Jiwoo", "Linh", "Minh", "Siti", "Rizal", "Tane", "Aroha", "Nikhil",
    "Farah", "Emre",
]

LAST_NAMES = [
    "Lopez", "Garcia", "Silva", "Santos", "Rossi", "Bianchi", "Dubois", "Martin", "Muller", "Schmidt",
    "Novak", "Kowalski", "Ivanov", "Petrova", "Murphy", "Kelly", "Hansen", "Larsen", "Smith", "Brown",
    "Johnson", "Walker", "Fernandez", "Moreno", "Costa",
    "Okafor", "Mensah", "Nkosi", "Dlamini", "Haddad", "Mansour", "Khalil", "Nasser", "Diallo", "Mwangi",
    "Abebe", "Yilmaz",
    "Sharma", "Patel", "Iyer", "Rahman", "Chen", "Wang", "Li", "Tanaka", "Sato", "Nakamura",
    "Kim", "Park", "Choi", "Nguyen", "Tran", "Santoso", "Reyes", "Cruz", "Ngata", "Walsh",
    "Kaya", "Hossain", "Ito",
]

# Cities that appear in train (and may also appear in test).
TRAIN_CITIES = [
    "Porto", "Lisbon", "Madrid", "Lyon", "Berlin", "Hamburg", "Oslo", "Krakow", "Prague", "Vienna",
    "Dublin", "Toronto", "Chicago", "Denver", "Austin", "Seattle", "Boston", "Mexico City", "Bogota",
    "Lima", "Buenos Aires", "Nairobi", "Lagos", "Accra", "Cairo", "Casablanca", "Cape Town",
    "Istanbul", "Mumbai", "Chennai", "Dhaka", "Bangkok", "Hanoi", "Manila", "Seoul", "Tokyo",
    "Osaka", "Taipei", "Sydney", "Auckland", "Helsinki", "Athens",
]
# Cities that appear only in test.
TEST_ONLY_CITIES = ["Montreal", "Marseille", "Kigali", "Jakarta", "Melbourne", "Valparaiso", "Gdansk", "Kyoto"]

JOBS = [
    "nurse", "teacher", "software engineer", "electrician", "architect", "accountant", "baker",
    "carpenter", "chef", "dentist", "farmer", "firefighter", "journalist", "lawyer", "librarian",
    "mechanic", "musician", "pharmacist", "photographer", "pilot", "plumber", "police officer",
    "graphic designer", "data analyst", "veterinarian", "translator", "taxi driver", "bus driver",
    "economist", "physiotherapist", "florist", "tailor", "barber", "welder", "web developer",
    "biologist", "surgeon", "painter", "social worker", "engineer", "optician", "interior designer",
]


def with_article(phrase: str) -> str:
    """'nurse' -> 'a nurse', 'engineer' -> 'an engineer' (the job list has no tricky cases)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# Placeholders: {name} {first} {age} {city} {job} {a_job} (job with article).
# "retired" templates are only used for ages >= 60; the job value stays the bare occupation.
TRAIN_TEMPLATES = [
    ("apposition", "{name}, a {age}-year-old {job}, lives in {city}."),
    ("years_old_works_as", "{name} is {age} years old, works as {a_job} and lives in {city}."),
    ("parenthesis_from", "{name} ({age}) is {a_job} from {city}."),
    ("meet", "Meet {name}, {a_job} in {city} who is {age}."),
    ("city_first", "In {city}, {age}-year-old {name} works as {a_job}."),
    ("lives_is_is", "{name} lives in {city}, is {age}, and is {a_job}."),
    ("at_age", "At {age}, {name} works as {a_job} in {city}."),
    ("terse_list", "{name}, {age}, {job}, {city}."),
    ("city_based", "{city}-based {job} {name} is {age} years old."),
    ("turned_this_year", "{name} turned {age} this year and works as {a_job} in {city}."),
    ("retired_aged", "{name}, a retired {job} aged {age}, lives in {city}."),
    ("neighbour", "Our new neighbour {name} is {a_job} from {city}, aged {age}."),
]
TEST_ONLY_TEMPLATES = [
    ("home_to", "{city} is home to {name}, {a_job} who is {age} years old."),
    ("earns_a_living", "Aged {age}, {name} earns a living as {a_job} in {city}."),
    ("now_retired", "Now {age}, {name} is a retired {job} living in {city}."),
    ("moved_to", "After moving to {city}, {name} now works as {a_job} at the age of {age}."),
]
RETIRED = {"retired_aged", "now_retired"}


def make_row(rng: random.Random, name: tuple[str, str], templates, cities) -> dict | None:
    key, template = rng.choice(templates)
    age = rng.randint(60, 90) if key in RETIRED else rng.randint(18, 90)
    city, job = rng.choice(cities), rng.choice(JOBS)
    full = f"{name[0]} {name[1]}"
    sentence = template.format(
        name=full, first=name[0], age=age, city=city, job=job, a_job=with_article(job)
    )
    answer = json.dumps({"name": full, "age": age, "city": city, "job": job}, ensure_ascii=False)
    if len(answer) > MAX_ANSWER_CHARS:
        return None
    return {
        "messages": [
            {"role": "user", "content": PROMPT_PREFIX + sentence},
            {"role": "assistant", "content": answer},
        ],
        "_template": key,
    }


def build(seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    names = [(f, l) for f in FIRST_NAMES for l in LAST_NAMES]
    rng.shuffle(names)
    # Disjoint pools of full names: every test name is a combination never seen in train.
    test_pool, train_pool = names[: 4 * n_test], names[4 * n_test :]

    train: list[dict] = []
    for name in train_pool:
        if len(train) == n_train:
            break
        row = make_row(rng, name, TRAIN_TEMPLATES, TRAIN_CITIES)
        if row is not None:
            train.append(row)

    # Test: half the rows use held-out templates, half use train templates; independently,
    # half the rows use held-out cities. Names are always held-out combinations.
    test: list[dict] = []
    for name in test_pool:
        if len(test) == n_test:
            break
        i = len(test)
        templates = TEST_ONLY_TEMPLATES if i % 2 == 0 else TRAIN_TEMPLATES
        cities = TEST_ONLY_CITIES if (i // 2) % 2 == 0 else TRAIN_CITIES
        row = make_row(rng, name, templates, cities)
        if row is not None:
            test.append(row)
    rng.shuffle(test)
    assert len(train) == n_train and len(test) == n_test
    def answer(row):
        return json.loads(row["messages"][1]["content"])
    train_names = {answer(r)["name"] for r in train}
    assert not train_names & {answer(r)["name"] for r in test}, "a test name leaked into train"
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps({"messages": row["messages"]}, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "people_json")
    args = parser.parse_args()

    train, test = build(args.seed, args.train, args.test)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} train rows and {len(test)} test rows to {args.out}")


if __name__ == "__main__":
    main()
