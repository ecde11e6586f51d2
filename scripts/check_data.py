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
        seen = Counter(normalise(t) for t, _ in rows)
        dups = [t for t, c in seen.items() if c > 1]
        if dups:
            problems.append(f"{path}: {len(dups)} duplicated messages, e.g. {dups[0]!r}")
    train_norm = {normalise(t) for t, _ in train}
    train_sets = [set(normalise(t).split()) for t, _ in train]
    index = {}
    for i, words in enumerate(train_sets):
        for w in words:
            index.setdefault(w, []).append(i)
    near = 0
    for text, _ in test:
        norm = normalise(text)
        if norm in train_norm:
            problems.append(f"test message also in training: {text!r}")
            continue
        words = set(norm.split())
        candidates = Counter(i for w in words for i in index.get(w, ()))
        for i, shared in candidates.items():
            if shared / len(words | train_sets[i]) >= NEAR:
                near += 1
                problems.append(f"near duplicate: {text!r} ~ {train[i][0]!r}")
                break
    print(f"near duplicates between the files (Jaccard >= {NEAR}): {near}")
    problems += check_extra(train_path, train_norm, test)
    for p in problems[:20]:
        print("PROBLEM:", p)
    return 1 if problems else 0


def check_extra(train_path, train_norm, test):
    """data/treino-extra.jsonl (beside the training file; not trained on by default, see the README's
    "Data"): the same format, no duplicate within it or with the training file, no near duplicate of a
    test message."""
    path = os.path.join(os.path.dirname(train_path), "treino-extra.jsonl")
    if not os.path.exists(path):
        return []
    rows, problems = load(path), []
    print(f"{path}: {len(rows)} examples {dict(sorted(Counter(label for _, label in rows).items()))}")
    seen = Counter(normalise(t) for t, _ in rows)
    problems += [f"{path}: duplicated message {t!r}" for t, c in seen.items() if c > 1][:5]
    problems += [f"{path}: also in {train_path}: {t!r}" for t in seen if t in train_norm][:5]
    extra_sets = [set(normalise(t).split()) for t, _ in rows]
    for text, _ in test:
        words = set(normalise(text).split())
        for ws in extra_sets:
            if len(words & ws) / len(words | ws) >= NEAR:
                problems.append(f"near duplicate: {text!r} in {path}")
                break
    return problems


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
