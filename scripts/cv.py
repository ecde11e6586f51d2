#!/usr/bin/env python3
"""Chooses among training recipes by k-fold cross-validation on the training
file, so that the choice rests on every training message held out once
instead of on the 451-message dev split (where recipes differ by one or two
messages, less than a seed moves them).

The training file is split into K stratified folds (one seeded shuffle per
label, dealt round-robin). For each recipe and fold, `triagem train` runs
exactly as a user runs it — its own dev split carved from the other K-1
folds, its own epoch choice and temperature — with the held-out fold as its
`--test` file; the report it writes (`metrics.json` → `test`) is pooled over
the folds: the confusion matrices are summed into out-of-fold accuracy and
macro-F1, the review curves into the share sent to review and the share of
errors caught. `--baseline` adds scripts/baseline.py (char TF-IDF + logistic
regression) on the same folds. The evaluation sets (data/teste.jsonl,
data/realistas.jsonl, the challenge's files) are never read.

The rule this prints: the incumbent recipe (`--incumbent`, default
`default`: the recipe of the shipped model) stays unless another recipe has
a higher out-of-fold macro-F1 *and* beats it on the paired held-out
predictions beyond noise — McNemar's z = (b − c) / √(b + c) ≥ 2, b the
messages only the incumbent gets wrong, c those only the challenger does;
among such challengers the highest macro-F1 wins. Without the incumbent
among the recipes: the highest out-of-fold macro-F1 (a tie to the faster).
Then, for the chosen recipe, the highest review threshold that sends at
most 5 % of the held-out messages to review. (The paired condition was added
on 30 Nov after a recipe led by 3 of 4,504 messages at z = 0.28 and the
pooled count alone chose it; see the README, "Choosing by cross-validation".)

Not run by CI (3 folds × a recipe is 6-20 minutes on 2 cores). A finished
fold is reused when its recipe, its data and `triagem train`'s defaults
(read from its --help) are unchanged, so an interrupted run picks up where it
stopped; a recipe's arguments are relative to the defaults, so `default=''`
after the defaults changed is another recipe, trained again. With --jobs
above 1 each training's own models (a soup's) train one at a time
(TRIAGEM_JOBS=1), the folds sharing the cores.

Usage:
  scripts/cv.py [--folds 3] [--seed 7] [--out target/cv] [--jobs 1] [--baseline] NAME='TRAIN ARGS' ...
  scripts/cv.py --baseline default='' ens2='--ensemble 2' scratch='--base none'
  scripts/cv.py lr-teacher='--teacher-scores {baseline_teacher}'

In a recipe's arguments, `--cv-extra FILE` (cv.py's own, not passed on) adds FILE's lines to each
fold's training part, the held-out folds unchanged: new training data measured on the same held-out
messages as the recipes without it. {baseline_teacher} stands for the baseline's
out-of-fold scores of that fold's training file (`scripts/baseline.py
--teacher-scores`, written once per fold), as the recipe would use them on
the whole training file.

Prints a markdown table and writes OUT/cv.json. Needs a built triagem
(TRIAGEM_BIN, else target/release/triagem).
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shlex
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REVIEW_SHARE = 0.05


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", default="data/treino.jsonl")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7, help="seed of the fold assignment")
    ap.add_argument("--out", default="target/cv")
    ap.add_argument("--baseline", action="store_true", help="also score scripts/baseline.py on the same folds")
    ap.add_argument("--incumbent", default="default", help="the recipe that stays unless beaten beyond noise")
    ap.add_argument("--jobs", type=int, default=1,
                    help="folds trained at once (a training uses one core: on N cores, up to N; "
                         "the seconds per fold are then measured on shared cores)")
    ap.add_argument("recipes", nargs="*", metavar="NAME=ARGS")
    a = ap.parse_args()
    os.chdir(ROOT)
    if a.folds < 2:
        sys.exit("cv.py: --folds must be at least 2")
    if a.jobs < 1:
        sys.exit("cv.py: --jobs must be at least 1")
    recipes = []
    for spec in a.recipes:
        name, sep, args = spec.partition("=")
        if not sep or not name or "/" in name:
            sys.exit(f"cv.py: recipe {spec!r}: write NAME='triagem train arguments' (NAME without '/')")
        args = shlex.split(args)
        extra, _ = split_extra(args)
        if extra == "" or (extra and not os.path.isfile(extra)):
            sys.exit(f"cv.py: recipe {name}: --cv-extra needs a JSONL file of training lines")
        recipes.append((name, args))
    if not recipes and not a.baseline:
        sys.exit("cv.py: give at least one recipe or --baseline")
    binary = os.environ.get("TRIAGEM_BIN", "target/release/triagem")
    if recipes and not os.access(binary, os.X_OK):
        sys.exit(f"cv.py: {binary} is not built (cargo build --release)")

    folds = write_folds(a.train, a.folds, a.seed, a.out)
    runs = ([("baseline", None)] if a.baseline else []) + recipes
    results = run_recipes(runs, folds, a.out, binary, a.jobs, train_defaults(binary) if recipes else None)

    print_table(results, a, fold_paths=folds)
    with open(os.path.join(a.out, "cv.json"), "w") as f:
        kept = [{k: v for k, v in r.items() if k != "predictions"} for r in results]
        json.dump({"train": a.train, "folds": a.folds, "seed": a.seed, "recipes": kept}, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"\n(JSON: {os.path.join(a.out, 'cv.json')})")


def write_folds(train, k, seed, out):
    """Stratified folds of the training file's lines; returns [(train_path, heldout_path)]."""
    lines = [l for l in open(train, encoding="utf-8").read().splitlines() if l.strip()]
    by_label = {}
    for i, line in enumerate(lines):
        try:
            label = json.loads(line)["completion"]
        except (ValueError, KeyError) as e:
            sys.exit(f"cv.py: {train}:{i + 1}: not a training line ({e})")
        by_label.setdefault(label, []).append(i)
    fold_of = [0] * len(lines)
    rng = random.Random(seed)
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            fold_of[i] = j % k
    paths = []
    for f in range(k):
        d = os.path.join(out, "folds", f"fold-{f + 1}")
        os.makedirs(d, exist_ok=True)
        tr, ho = os.path.join(d, "train.jsonl"), os.path.join(d, "heldout.jsonl")
        write_if_changed(tr, "".join(l + "\n" for l, g in zip(lines, fold_of) if g != f))
        write_if_changed(ho, "".join(l + "\n" for l, g in zip(lines, fold_of) if g == f))
        paths.append((tr, ho))
    return paths


def write_if_changed(path, text):
    if os.path.exists(path) and open(path, encoding="utf-8").read() == text:
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def train_defaults(binary):
    """`triagem train`'s defaults as its --help prints them, option by option (those that cannot
    change the model left out). A recipe's arguments are relative to them, so a fold is reused only
    when they are unchanged too: after the defaults change, `default=''` is another recipe."""
    text = subprocess.run([binary, "train", "--help"], check=True, capture_output=True, text=True).stdout
    defaults, option = {}, None
    for line in text.splitlines():
        m = re.match(r"\s+(?:-\w, )?--([a-z0-9-]+)", line)
        if m:
            option = m.group(1)
        m = re.search(r"\[default: (.*)\]", line)
        if m and option and option not in ("jobs", "threads", "quiet"):
            defaults[option] = m.group(1)
    return defaults


def run_recipes(recipes, folds, out, binary, jobs, defaults):
    """Trains (or reuses) one model per recipe and fold, `jobs` at a time, and pools each recipe's
    held-out reports. A training is one core's work (see the README, "Training speed"), so on a
    machine with N cores N folds train at once in little more than the time of one (three 1-epoch
    folds on 2 cores: 10 s each two at a time against 8 s alone; 22 s in all against 26 s)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as executor:
        runs = {(name, f): executor.submit(run_fold, name, args, f, tr, ho, len(folds), out, binary, defaults, jobs)
                for name, args in recipes for f, (tr, ho) in enumerate(folds, 1)}
        done = {key: run.result() for key, run in runs.items()}
    results = []
    for name, args in recipes:
        reports = [done[(name, f)][0] for f in range(1, len(folds) + 1)]
        seconds = [done[(name, f)][1] for f in range(1, len(folds) + 1)]
        result = pool(name, args, reports, seconds)
        result["predictions"] = [predictions(os.path.join(out, name, f"fold-{f}"), args, tr, ho, binary)
                                 for f, (tr, ho) in enumerate(folds, 1)]
        results.append(result)
    return results


TEACHER_LOCK = threading.Lock()


def run_fold(name, args, f, tr, ho, nfolds, out, binary, defaults, jobs):
    """Trains (or reuses) recipe `name`'s model of fold `f`; returns its held-out report and seconds.
    With folds `jobs` > 1 at a time, each training's own independent models (a soup's) train one
    at a time (TRIAGEM_JOBS=1), so that the cores are shared by the folds."""
    d = os.path.join(out, name, f"fold-{f}")
    os.makedirs(d, exist_ok=True)
    stamp = {"args": args, "train": sha256(tr), "heldout": sha256(ho)}
    if args is not None:
        stamp["defaults"] = defaults
        extra, _ = split_extra(args)
        if extra:
            stamp["extra"] = sha256(extra)
    stamp_path = os.path.join(d, "recipe.json")
    report_path = os.path.join(d, "heldout.json")
    if os.path.exists(report_path) and os.path.exists(stamp_path) and json.load(open(stamp_path)) == stamp:
        saved = json.load(open(report_path))
        print(f"{name} fold {f}: reused ({d})", file=sys.stderr)
        model = os.path.join(d, "model")
        if "error_auroc" not in saved["report"] and args is not None and os.path.isdir(model):
            # A fold trained before `triagem eval` reported it (8 Dec): its model scores the held-out
            # messages again (the same report, to the last digits of the ECE), and the figure is kept.
            res = subprocess.run([binary, "eval", "--model", model, "--data", ho, "--json"],
                                 check=True, capture_output=True, text=True)
            saved["report"]["error_auroc"] = json.loads(res.stdout)["error_auroc"]
            with open(report_path, "w") as fh:
                json.dump(saved, fh, ensure_ascii=False)
        return saved["report"], saved["seconds"]
    print(f"{name} fold {f}/{nfolds}: training …", file=sys.stderr, flush=True)
    if os.path.exists(os.path.join(d, "predictions.json")):
        os.remove(os.path.join(d, "predictions.json"))
    started = time.monotonic()
    if args is None:
        cmd = [sys.executable, "scripts/baseline.py", "--train", tr, "--data", ho, "--json",
               "--predictions", os.path.join(d, "predictions.json")]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        report = json.loads(res.stdout.splitlines()[-1])
    else:
        model = os.path.join(d, "model")
        fold_args = args
        if any("{baseline_teacher}" in x for x in args):
            scores = os.path.join(os.path.dirname(tr), "baseline-teacher.jsonl")
            with TEACHER_LOCK:  # one fold's scores, shared by its recipes: written once
                if not os.path.exists(scores) or os.path.getmtime(scores) < os.path.getmtime(tr):
                    subprocess.run([sys.executable, "scripts/baseline.py", "--train", tr, "--teacher-scores", scores],
                                   check=True)
            fold_args = [x.replace("{baseline_teacher}", scores) for x in args]
        fold_train = tr
        extra, fold_args = split_extra(fold_args)
        if extra:
            fold_train = os.path.join(d, "train.jsonl")
            with open(fold_train, "w", encoding="utf-8") as fh:
                for path in (tr, extra):
                    fh.writelines(l if l.endswith("\n") else l + "\n" for l in open(path, encoding="utf-8") if l.strip())
        cmd = [binary, "train", "--quiet", "--train", fold_train, "--test", ho, "--out", model, *fold_args]
        env = dict(os.environ, TRIAGEM_JOBS="1") if jobs > 1 else None
        with open(os.path.join(d, "train.log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
        report = json.load(open(os.path.join(model, "metrics.json")))["test"]
    elapsed = time.monotonic() - started
    print(f"{name} fold {f}: macro-F1 {report['macro_f1']:.4f} in {elapsed:.0f} s", file=sys.stderr, flush=True)
    with open(report_path, "w") as fh:
        json.dump({"report": report, "seconds": elapsed}, fh, ensure_ascii=False)
    with open(stamp_path, "w") as fh:
        json.dump(stamp, fh)
    return report, elapsed


def split_extra(args):
    """(the FILE of a recipe's `--cv-extra FILE` — None without the option, "" without the file —,
    the arguments for `triagem train`, the option left out)."""
    if "--cv-extra" not in args:
        return None, args
    i = args.index("--cv-extra")
    return (args[i + 1] if i + 1 < len(args) else ""), args[:i] + args[i + 2:]


def predictions(d, args, train, heldout, binary):
    """The fold model's label for each held-out line (kept in the fold's predictions.json)."""
    path = os.path.join(d, "predictions.json")
    if not os.path.exists(path) and args is None:
        subprocess.run([sys.executable, "scripts/baseline.py", "--train", train, "--data", heldout,
                        "--predictions", path], check=True, capture_output=True)
    elif not os.path.exists(path):
        texts = [json.loads(l)["prompt"] for l in open(heldout, encoding="utf-8") if l.strip()]
        if any("\n" in t for t in texts):
            sys.exit(f"cv.py: {heldout}: a text holds a line break; triagem classify reads one text a line")
        res = subprocess.run([binary, "classify", "--json", "--model", os.path.join(d, "model")],
                             input="".join(t + "\n" for t in texts), capture_output=True, text=True, check=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump([json.loads(line)["label"] for line in res.stdout.splitlines()], f, ensure_ascii=False)
    return json.load(open(path, encoding="utf-8"))


def paired(a, b, folds):
    """(only a wrong, only b wrong, both wrong) over the held-out lines of every fold."""
    only_a = only_b = both = 0
    for f, (_, ho) in enumerate(folds):
        truth = [json.loads(l)["completion"] for l in open(ho, encoding="utf-8") if l.strip()]
        for y, pa, pb in zip(truth, a["predictions"][f], b["predictions"][f]):
            wa, wb = pa != y, pb != y
            only_a += wa and not wb
            only_b += wb and not wa
            both += wa and wb
    return only_a, only_b, both


def pool(name, args, reports, seconds):
    labels = reports[0]["confusion"]["labels"]
    n = len(labels)
    matrix = [[0] * n for _ in range(n)]
    for r in reports:
        if r["confusion"]["labels"] != labels:
            sys.exit(f"cv.py: {name}: folds report different labels")
        for i in range(n):
            for j in range(n):
                matrix[i][j] += r["confusion"]["matrix"][i][j]
    total = sum(map(sum, matrix))
    right = sum(matrix[i][i] for i in range(n))
    f1s = []
    for i in range(n):
        tp = matrix[i][i]
        predicted = sum(matrix[r][i] for r in range(n))
        actual = sum(matrix[i])
        p = tp / predicted if predicted else 0.0
        rec = tp / actual if actual else 0.0
        f1s.append(2 * p * rec / (p + rec) if p + rec else 0.0)
    review = []
    for t in range(len(reports[0]["review"])):
        sent = caught = errors = 0
        for r in reports:
            point = r["review"][t]
            wrong = r["examples"] - sum(r["confusion"]["matrix"][i][i] for i in range(n))
            sent += round(point["sent_to_review"] * r["examples"])
            caught += round(point["errors_caught"] * wrong)
            errors += wrong
        review.append({
            "min_confidence": reports[0]["review"][t]["min_confidence"],
            "sent_to_review": sent / total,
            "errors_caught": caught / errors if errors else 0.0,
        })
    return {
        "name": name,
        "args": args,
        "fold_macro_f1": [r["macro_f1"] for r in reports],
        "examples": total,
        "errors": total - right,
        "accuracy": right / total,
        "macro_f1": sum(f1s) / n,
        "confusion": {"labels": labels, "matrix": matrix},
        "ece_mean": sum(r["ece"] * r["examples"] for r in reports) / total,
        # The baseline's folds scored before baseline.py reported it (8 Dec) have none: then None.
        "error_auroc_mean": (sum(r["error_auroc"] for r in reports) / len(reports)
                             if all(r.get("error_auroc") is not None for r in reports) else None),
        "review": review,
        "seconds_per_fold": sum(seconds) / len(seconds),
    }


def print_table(results, a, fold_paths):
    print(f"{a.folds}-fold cross-validation on {a.train} (fold seed {a.seed}), every message held out once\n")
    print("| recipe | `triagem train` arguments | macro-F1 per fold | out-of-fold accuracy / macro-F1 (errors) | ECE (fold mean) | s per fold |")
    print("|---|---|---|---|---|---|")
    for r in results:
        args = "(scripts/baseline.py)" if r["args"] is None else ("`" + shlex.join(r["args"]) + "`" if r["args"] else "(defaults)")
        folds = " / ".join(f"{x:.4f}" for x in r["fold_macro_f1"])
        print(f"| {r['name']} | {args} | {folds} | {r['accuracy']:.4f} / {r['macro_f1']:.4f} ({r['errors']} of {r['examples']}) "
              f"| {r['ece_mean']:.4f} | {r['seconds_per_fold']:.0f} |")
    print("\nreview curve, out of fold (threshold: % sent to review / % of errors caught), "
          "and the error-detection AUROC (fold mean)")
    for r in results:
        auroc = "—" if r["error_auroc_mean"] is None else f"{r['error_auroc_mean']:.4f}"
        print(f"  {r['name']} (AUROC {auroc}): " + "  ".join(
            f"{p['min_confidence']:.2f}: {100 * p['sent_to_review']:.1f}/{100 * p['errors_caught']:.0f}" for p in r["review"]))
    models = [r for r in results if r["args"] is not None]
    incumbent = next((r for r in models if r["name"] == a.incumbent), None)
    if incumbent:
        print(f"\npaired with the incumbent ({incumbent['name']}), out of fold: "
              "only the incumbent wrong / only this recipe wrong / both, McNemar z")
        beaten = []
        for r in results:
            if r is incumbent:
                continue
            b, c, both = paired(incumbent, r, fold_paths)
            z = (b - c) / (b + c) ** 0.5 if b + c else 0.0
            print(f"  {r['name']}: {b} / {c} / {both}, z = {z:+.2f}")
            if r in models and r["macro_f1"] > incumbent["macro_f1"] and z >= 2:
                beaten.append(r)
        best = max(beaten, key=lambda r: r["macro_f1"]) if beaten else incumbent
        print(f"\nchosen (the incumbent unless beaten with z ≥ 2 and a higher macro-F1): {best['name']}")
    elif models:
        best = max(models, key=lambda r: (round(r["macro_f1"], 6), -r["seconds_per_fold"]))
        print(f"\nchosen (highest out-of-fold macro-F1, ties to the faster): {best['name']}")
    if models:
        fits = [p for p in best["review"] if p["sent_to_review"] <= REVIEW_SHARE]
        if fits:
            p = max(fits, key=lambda p: p["min_confidence"])
            print(f"its review threshold (highest sending ≤ {REVIEW_SHARE:.0%} of held-out messages): "
                  f"{p['min_confidence']:.2f} ({100 * p['sent_to_review']:.1f} % sent, {100 * p['errors_caught']:.0f} % of errors caught)")


if __name__ == "__main__":
    main()
