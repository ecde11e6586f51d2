#!/usr/bin/env python3
"""The baseline a reviewer reaches for first: character n-gram TF-IDF
(char_wb, 2-5) + logistic regression (scikit-learn, C=10), trained on the same
training file as `triagem train`, scored with the same metrics as
`triagem eval --json` (accuracy, per-label precision/recall/F1/support,
macro-F1, confusion matrix, the most confident mistakes, ECE over 10 bins,
the error-detection AUROC and the review curve) so that the two can sit side by side in one table.

Not run by CI. The first run creates `venv-baseline/` at the repository root
with scikit-learn from PyPI and re-runs itself inside it.

Usage:
  scripts/baseline.py [--train data/treino.jsonl] --data FILE [--data FILE ...] [--json]
  scripts/baseline.py [--train data/treino.jsonl] --teacher-scores OUT.jsonl

With --teacher-scores it writes, for `triagem train --teacher-scores`, the
baseline's probabilities of every training text, each from a model fitted
on the other four of five folds (stratified, seed 0), so that a text's
scores say how the baseline does on it unseen, not how well it remembers it:
one `{"prompt": text, "scores": {label: probability}}` a line.

With --json it prints one line per data file: the object `triagem eval --json`
prints, plus "data" (the file) and "model" ("char-tfidf-lr").
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "venv-baseline")

# Thresholds of the review curve, the same as `triagem eval` reports.
THRESHOLDS = [0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]


def ensure_sklearn():
    try:
        import sklearn  # noqa: F401
        return
    except ImportError:
        pass
    python = os.path.join(VENV, "bin", "python")
    if os.path.abspath(sys.executable) == os.path.abspath(python):
        sys.exit("baseline.py: scikit-learn is missing from venv-baseline/; remove the directory and run again")
    if not os.path.exists(python):
        print(f"baseline.py: creating {VENV} with scikit-learn (once)", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call([python, "-m", "pip", "install", "-q", "scikit-learn"])
    os.execv(python, [python, *sys.argv])


def load(path):
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text, label = obj["prompt"], obj["completion"]
            except (ValueError, KeyError, TypeError) as e:
                sys.exit(f"{path}:{n}: not a {{\"prompt\", \"completion\"}} line: {e}")
            texts.append(text)
            labels.append(label)
    return texts, labels


def reliability(confidences, correct, bins=10):
    """Equal-width bins of the top score over (0, 1] (0 in the first), as `triagem eval`'s
    `reliability`: per non-empty bin, its bounds, examples, mean score and accuracy."""
    table = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if not idx:
            continue
        table.append({
            "lower": lo,
            "upper": hi,
            "examples": len(idx),
            "mean_confidence": sum(confidences[i] for i in idx) / len(idx),
            "accuracy": sum(correct[i] for i in idx) / len(idx),
        })
    return table


def expected_calibration_error(table):
    """Sum over the reliability table's bins of |bin| / n * |accuracy - mean confidence|."""
    n = sum(b["examples"] for b in table)
    return sum(b["examples"] / n * abs(b["accuracy"] - b["mean_confidence"]) for b in table) if n else 0.0


def review_curve(confidences, correct):
    n, errors = len(confidences), sum(1 for c in correct if not c)
    rows = []
    for t in THRESHOLDS:
        sent = [i for i, c in enumerate(confidences) if c < t]
        caught = sum(1 for i in sent if not correct[i])
        rows.append({
            "min_confidence": t,
            "sent_to_review": len(sent) / n if n else 0.0,
            "errors_caught": caught / errors if errors else 0.0,
        })
    return rows


def error_detection_auroc(confidences, correct):
    """As `triagem eval`'s `error_auroc`: the probability that a wrong prediction drawn at random
    scores below a right one drawn at random, ties counting half; None without both kinds."""
    errors = sum(1 for c in correct if not c)
    rights = len(correct) - errors
    if not errors or not rights:
        return None
    order = sorted(range(len(confidences)), key=lambda i: confidences[i])
    below = pairs = 0
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and confidences[order[j]] == confidences[order[i]]:
            j += 1
        wrong = sum(1 for k in order[i:j] if not correct[k])
        pairs += (j - i - wrong) * (below + wrong / 2)
        below += wrong
        i = j
    return pairs / (errors * rights)


def report(labels, texts, truth, predicted, confidences):
    index = {l: i for i, l in enumerate(labels)}
    k = len(labels)
    matrix = [[0] * k for _ in range(k)]
    mistakes = []
    for text, t, p, c in zip(texts, truth, predicted, confidences):
        if t in index:
            matrix[index[t]][index[p]] += 1
        if t != p:
            mistakes.append({"text": text, "label": t, "predicted": p, "score": c})
    mistakes.sort(key=lambda m: -m["score"])
    per_label = {}
    for i, l in enumerate(labels):
        tp = matrix[i][i]
        support = sum(matrix[i])
        pred = sum(row[i] for row in matrix)
        precision = tp / pred if pred else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[l] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = [t == p for t, p in zip(truth, predicted)]
    n = len(texts)
    table = reliability(confidences, correct)
    return {
        "examples": n,
        "accuracy": sum(correct) / n if n else 0.0,
        "macro_f1": sum(s["f1"] for s in per_label.values()) / max(k, 1),
        "per_label": per_label,
        "confusion": {"labels": labels, "matrix": matrix},
        "mistakes": mistakes[:10],
        "ece": expected_calibration_error(table),
        "reliability": table,
        "error_auroc": error_detection_auroc(confidences, correct),
        "review": review_curve(confidences, correct),
    }


def main():
    ensure_sklearn()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", default=os.path.join(ROOT, "data", "treino.jsonl"))
    ap.add_argument("--data", action="append", default=[], help="labelled JSONL to score (repeatable)")
    ap.add_argument("--json", action="store_true", help="one JSON object per data file")
    ap.add_argument("--teacher-scores", metavar="OUT", help="write out-of-fold scores of the training texts")
    ap.add_argument("--predictions", metavar="OUT", help="write the predicted label of each line of the (one) --data file, as a JSON list")
    a = ap.parse_args()
    if not a.data and not a.teacher_scores:
        ap.error("give --data FILE (to score) or --teacher-scores OUT")
    if a.predictions and len(a.data) != 1:
        ap.error("--predictions needs exactly one --data file")

    train_texts, train_labels = load(a.train)
    model = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5)),
        LogisticRegression(C=10, max_iter=2000),
    )
    if a.teacher_scores:
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
        probs = cross_val_predict(model, train_texts, train_labels, cv=folds, method="predict_proba")
        labels = sorted(set(train_labels))  # the column order of predict_proba
        with open(a.teacher_scores, "w", encoding="utf-8") as f:
            for text, row in zip(train_texts, probs):
                scores = {l: float(p) for l, p in zip(labels, row)}
                f.write(json.dumps({"prompt": text, "scores": scores}, ensure_ascii=False) + "\n")
        print(f"baseline.py: out-of-fold scores of {len(train_texts)} training texts in {a.teacher_scores}",
              file=sys.stderr)
    model.fit(train_texts, train_labels)
    labels = [str(l) for l in model.classes_]
    for path in a.data:
        texts, truth = load(path)
        unknown = sorted(set(truth) - set(labels))
        if unknown:
            sys.exit(f"{path}: labels {unknown} are not in the training data")
        probs = model.predict_proba(texts)
        predicted = [labels[max(range(len(labels)), key=lambda j: row[j])] for row in probs]
        confidences = [float(max(row)) for row in probs]
        if a.predictions:
            with open(a.predictions, "w", encoding="utf-8") as f:
                json.dump(predicted, f, ensure_ascii=False)
        r = report(labels, texts, truth, predicted, confidences)
        if a.json:
            print(json.dumps({"model": "char-tfidf-lr", "data": path, **r}, ensure_ascii=False))
        else:
            print(f"{path}: examples {r['examples']}  accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  "
                  f"ECE {r['ece']:.4f}")


if __name__ == "__main__":
    main()
