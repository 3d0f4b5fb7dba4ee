"""Train/evaluate/test splits of a collection by fold, and seeded stratified folds where it has none.

One rule for tables and folder trees: rows (or files) carry a fold; ``eval_folds`` and
``test_folds`` name the held-out folds and ``train_folds`` (default: the rest) the training folds.
A collection without folds is dealt into folds per class, so every class is in every fold and a
re-run with the same seed gives the same split; k-fold cross-validation uses the same folds.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from asc.data.clips import Clip
from asc.errors import DatasetError


def fold_order(folds: set[str]) -> list[str]:
    """Fold values in natural order: numbers numerically ("2" before "10"), then names."""
    return sorted(folds, key=lambda fold: (0, int(fold), "") if fold.isdigit() else (1, 0, fold))


def assign_folds(clips: Sequence[Clip], num_folds: int, seed: int) -> list[Clip]:
    """Each clip with a fold "1" … ``num_folds``: per class, shuffled (seeded), dealt round-robin.

    The deal continues across classes, so fold sizes differ by at most one clip; a class with
    fewer clips than folds is missing from some folds.
    """
    by_label: dict[str | None, list[int]] = {}
    for index, clip in enumerate(clips):
        by_label.setdefault(clip.label, []).append(index)
    folds: dict[int, str] = {}
    dealt = 0
    for label in sorted(by_label, key=lambda name: (name is None, name or "")):
        members = sorted(by_label[label], key=lambda i: str(clips[i].path))
        random.Random(f"{seed}:{label}").shuffle(members)
        for index in members:
            folds[index] = str(dealt % num_folds + 1)
            dealt += 1
    return [replace(clip, fold=folds[i]) for i, clip in enumerate(clips)]


def split_by_folds(
    clips: Sequence[Clip],
    source: Path,
    *,
    train_folds: Sequence[object] | None = None,
    eval_folds: Sequence[object] | None = None,
    test_folds: Sequence[object] = (),
) -> dict[str, list[Clip]]:
    """Clips grouped into "train", "evaluate" and "test" by their fold.

    ``eval_folds=None`` holds out the last fold. Clips in none of the named folds are left out (so
    ``train_folds`` can select a subset); a named fold the collection lacks is an error naming the
    folds it has, since a typo would otherwise train on the wrong data silently.
    """
    found = fold_order({clip.fold for clip in clips if clip.fold is not None})
    if not found:
        raise DatasetError(source, "no fold values to split by", "set data.fold_column to the table's fold column")
    evaluate = [found[-1]] if eval_folds is None else [str(fold) for fold in eval_folds]
    test = [str(fold) for fold in test_folds]
    held_out = set(evaluate) | set(test)
    train = [f for f in found if f not in held_out] if train_folds is None else [str(f) for f in train_folds]
    for option, named in (("train_folds", train), ("eval_folds", evaluate), ("test_folds", test)):
        unknown = [fold for fold in named if fold not in found]
        if unknown:
            raise DatasetError(source, f"data.{option} names fold(s) {', '.join(unknown)} that no clip is in "
                               f"(folds found: {', '.join(found)})", f"set data.{option} to folds found")
    for first, second, (a, b) in ((train, evaluate, ("train_folds", "eval_folds")),
                                  (train, test, ("train_folds", "test_folds")),
                                  (evaluate, test, ("eval_folds", "test_folds"))):
        if shared := sorted(set(first) & set(second)):
            raise DatasetError(source, f"fold(s) {', '.join(shared)} are in both data.{a} and data.{b}",
                               "give each fold to one split")
    split_of = {**dict.fromkeys(train, "train"), **dict.fromkeys(evaluate, "evaluate"), **dict.fromkeys(test, "test")}
    splits: dict[str, list[Clip]] = {name: [] for name in ("train", "evaluate", "test") if name in split_of.values()}
    for clip in clips:
        if clip.fold in split_of:
            splits[split_of[clip.fold]].append(clip)
    return splits
