#!/usr/bin/env python3
"""Checks the project's data set: format, balance, sizes, no duplicates within a
file and no exact or near duplicate between the training and the test file
(nor between data/treino-extra.jsonl, when present, and either).

Near duplicate: after lower-casing, dropping accents and punctuation, the two
messages' word sets overlap with Jaccard similarity >= 0.8.

Usage: scripts/check_data.py [data/treino.jsonl data/teste.jsonl]
"""
import json
import os
import re
import sys
import unicodedata
from collections import Counter

NEAR = 0.8


def normalise(text):
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.findall(r"\w+", text))


def load(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            assert set(obj) == {"prompt", "completion"}, f"{path}:{n}: keys {sorted(obj)}"
            assert isinstance(obj["prompt"], str) and obj["prompt"].strip(), f"{path}:{n}: empty prompt"
            rows.append((obj["prompt"], obj["completion"]))
    return rows


def main(train_path="data/treino.jsonl", test_path="data/teste.jsonl"):
    train, test = load(train_path), load(test_path)
    problems = []
    for path, rows, minimum in ((train_path, train, 3000), (test_path, test, 600)):
        counts = Counter(label for _, label in rows)
        print(f"{path}: {len(rows)} examples {dict(sorted(counts.items()))}")
        if len(rows) < minimum:
            problems.append(f"{path}: {len(rows)} examples, fewer than {minimum}")
        if max(counts.values()) > 1.2 * min(counts.values()):
            problems.append(f"{path}: unbalanced labels {dict(counts)}")
        dups = duplicated(rows)
        if dups:
            problems.append(f"{path}: {len(dups)} duplicated messages, e.g. {dups[0]!r}")
    near = 0
    for text, other in overlaps(test, train):
        if other is None:
            problems.append(f"test message also in training: {text!r}")
        else:
            near += 1
            problems.append(f"near duplicate: {text!r} ~ {other!r}")
    print(f"near duplicates between the files (Jaccard >= {NEAR}): {near}")
    problems += check_extra(train_path, train, test)
    for p in problems[:20]:
        print("PROBLEM:", p)
    return 1 if problems else 0


def duplicated(rows):
    """The (normalised) messages that appear more than once in `rows`."""
    seen = Counter(normalise(t) for t, _ in rows)
    return [t for t, c in seen.items() if c > 1]


def overlaps(test, rows):
    """(test message, None) for each test message also in `rows` (normalised), (test message, the row's
    message) for each near duplicate of one (word Jaccard >= NEAR); at most one per test message."""
    norms = {normalise(t) for t, _ in rows}
    sets = [set(normalise(t).split()) for t, _ in rows]
    index = {}
    for i, words in enumerate(sets):
        for w in words:
            index.setdefault(w, []).append(i)
    found = []
    for text, _ in test:
        norm = normalise(text)
        if norm in norms:
            found.append((text, None))
            continue
        words = set(norm.split())
        candidates = Counter(i for w in words for i in index.get(w, ()))
        near = next((i for i, shared in candidates.items() if shared / len(words | sets[i]) >= NEAR), None)
        if near is not None:
            found.append((text, rows[near][0]))
    return found


def check_extra(train_path, train, test):
    """data/treino-extra.jsonl (beside the training file; not trained on by default, see the README's
    "Data"): the same format, no duplicate within it or with the training file, no exact or near
    duplicate of a test message."""
    path = os.path.join(os.path.dirname(train_path), "treino-extra.jsonl")
    if not os.path.exists(path):
        return []
    rows = load(path)
    print(f"{path}: {len(rows)} examples {dict(sorted(Counter(label for _, label in rows).items()))}")
    problems = [f"{path}: duplicated message {t!r}" for t in duplicated(rows)][:5]
    train_norm = {normalise(t) for t, _ in train}
    problems += [f"{path}: also in {train_path}: {t!r}" for t in {normalise(t) for t, _ in rows} & train_norm][:5]
    problems += [f"test message in {path}: {text!r}" + ("" if other is None else f" ~ {other!r}")
                 for text, other in overlaps(test, rows)]
    return problems


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
