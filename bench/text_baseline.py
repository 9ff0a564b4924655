"""Benchmark: how far the notes alone go on the garbage demo (a classical text baseline).

For each seed it draws the garbage set with that seed, fits scikit-learn's bag of words
(``CountVectorizer``) and a class-balanced logistic regression on the training notes, picks
the regularisation C on the validation split, and prints validation and test macro F1. The
garbage set is built so that the notes alone cannot sort it (bench/README.md, "Fusion gain").

    .venv/bin/python -m bench.text_baseline --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from bench._searches import mean, print_table
from search.data.demo_garbage import generate_garbage
from search.data.index import load_index


def score(root: Path, seed: int) -> tuple[float, float, float]:
    """(C, val macro F1, test macro F1) of the bag-of-words model with C chosen on val."""
    data = SimpleNamespace(root=root, format="folders", modalities=["rgb", "text"],
                           val_fraction=0.15, test_fraction=0.15)
    splits = load_index(data, seed=seed).splits
    texts = {name: [s.text for s in samples] for name, samples in splits.items()}
    labels = {name: [s.label for s in samples] for name, samples in splits.items()}
    words = CountVectorizer().fit(texts["train"])
    best = None
    for c in (0.01, 0.1, 1.0, 10.0, 100.0):
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
        model.fit(words.transform(texts["train"]), labels["train"])
        f1 = {name: f1_score(labels[name], model.predict(words.transform(texts[name])),
                             average="macro") for name in ("val", "test")}
        if best is None or f1["val"] > best[1]:
            best = (c, f1["val"], f1["test"])
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated data seeds")
    args = parser.parse_args()
    lines, tests = [], []
    with tempfile.TemporaryDirectory(prefix="fs-text-") as temp:
        for seed in (int(s) for s in args.seeds.split(",")):
            root = Path(temp) / f"garbage-{seed}"
            generate_garbage(root, seed=seed, size=16)  # the notes do not depend on the size
            c, val, test = score(root, seed)
            tests.append(test)
            lines.append([str(seed), f"{c:g}", f"{val:.4f}", f"{test:.4f}"])
    print_table(["seed", "C (chosen on val)", "val macro F1", "test macro F1"], lines)
    print(f"\nmean test macro F1 {mean(tests):.4f}")


if __name__ == "__main__":
    main()
