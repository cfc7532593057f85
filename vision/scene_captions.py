"""Captions for digit scenes: five true sentences per scene from a small grammar, and the parser that reads a
generated caption back into the layout it claims.

A scene's layout is its digits in reading order along one axis, each with a size word: with two or more
digits the axis is the one along which the digits' box centres spread more (left to right, or top to
bottom); a digit is "large" when its box is at least `large` of the canvas side tall, else "small".

    one digit: a large 3                                    (and four more phrasings)
    two digits: a small 1 on the left and a large 7 on the right
    a small 1 to the left of a large 7  /  a large 7 to the right of a small 1
    three digits: a large 2, a small 0 and a small 5 from top to bottom

`parse(tokens, classes)` inverts every phrasing, so a test checks the grammar against the layout it was made
from, and the captioning task scores generated captions by what they claim: the right digits (the same
multiset of classes), the right relation (the same classes in the same order along the same axis), and the
right sizes too (`exact`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from text.data import tokenize
from vision.scenes import Scenes

COUNTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SIZES = ("small", "large")
AXES = {"x": ("left", "right", "to the left of", "to the right of", "on the left", "on the right"),
        "y": ("top", "bottom", "above", "below", "at the top", "at the bottom")}


@dataclass(frozen=True)
class Layout:
    """What a caption says: classes (indices) in order along `axis` ("x", "y"; None for one digit), and sizes."""

    classes: tuple[int, ...]
    sizes: tuple[str, ...]
    axis: str | None

    def digits(self) -> Counter:
        return Counter(self.classes)


def layout_of(boxes: torch.Tensor, labels: torch.Tensor, canvas: int, large: float) -> Layout:
    """The layout of one scene from its boxes ((k, 4) xyxy) and labels ((k,))."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    axis = None
    order = torch.arange(len(boxes))
    if len(boxes) > 1:
        axis = "x" if float(cx.max() - cx.min()) >= float(cy.max() - cy.min()) else "y"
        order = torch.argsort(cx if axis == "x" else cy, stable=True)
    heights = boxes[:, 3] - boxes[:, 1]
    sizes = tuple(SIZES[int(heights[i] >= large * canvas)] for i in order.tolist())
    return Layout(tuple(int(labels[i]) for i in order.tolist()), sizes, axis)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou8" else "a ") + phrase


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(layout: Layout, classes: Sequence[str]) -> list[str]:
    """Five captions true of `layout` (module docstring); `classes` are the class names."""
    m = [_article(f"{size} {classes[c].lower()}") for c, size in zip(layout.classes, layout.sizes)]
    n = COUNTS[len(m)] if len(m) < len(COUNTS) else str(len(m))
    if len(m) == 1:
        return [f"one digit: {m[0]}", m[0], f"a single digit, {m[0]}", f"there is one digit: {m[0]}",
                f"an image of {m[0]}"]
    first, last, before, after, at_first, at_last = AXES[layout.axis]
    span = f"from {first} to {last}"
    if len(m) == 2:
        return [f"two digits: {m[0]} {at_first} and {m[1]} {at_last}", f"{m[0]} {before} {m[1]}",
                f"{m[1]} {after} {m[0]}", f"two digits, {m[0]} and {m[1]}, {span}",
                f"there are two digits: {m[0]} {at_first} and {m[1]} {at_last}"]
    listed = _listing(m)
    return [f"{n} digits: {listed} {span}", f"{listed} {span}", f"{span}: {listed}", f"{n} digits {span}: {listed}",
            f"there are {n} digits: {listed} {span}"]


def parse(tokens: Sequence[str], classes: Sequence[str]) -> Layout | None:
    """The layout a caption (its tokens, as `text.data.tokenize` gives them) claims; None when it names no
    digit. Mentions are "a|an <size> <class>"; the order words say how the listing maps onto the axis."""
    names = sorted(((tuple(tokenize(c)), k) for k, c in enumerate(classes)), key=lambda t: -len(t[0]))
    found: list[tuple[int, str]] = []
    rest: list[str] = []  # the words around the mentions (a class name may hold "top")
    i = 0
    while i < len(tokens):
        if tokens[i] in ("a", "an") and i + 1 < len(tokens) and tokens[i + 1] in SIZES:
            match = next(((w, k) for w, k in names if tuple(tokens[i + 2: i + 2 + len(w)]) == w), None)
            if match is not None:
                found.append((match[1], tokens[i + 1]))
                rest.append("<digit>")
                i += 2 + len(match[0])
                continue
        rest.append(tokens[i])
        i += 1
    if not found:
        return None
    tokens, text = rest, " ".join(rest)
    axis, reverse = None, False
    if len(found) > 1:
        if " right of " in f" {text} " or " below " in f" {text} ":
            reverse = True
        hits = {a: sum(w in tokens for w in AXES[a][:2]) + sum(f" {p} " in f" {text} " for p in AXES[a][2:4])
                for a in AXES}
        axis = max(hits, key=hits.get) if max(hits.values()) else None
    if reverse:
        found.reverse()
    return Layout(tuple(k for k, _ in found), tuple(s for _, s in found), axis)


def score(claimed: Sequence[Layout | None], truth: Sequence[Layout]) -> dict[str, float]:
    """Shares of captions with the right digits, the right relation (order along the axis) and right sizes."""
    digits = relation = exact = 0
    for c, t in zip(claimed, truth):
        if c is None or c.digits() != t.digits():
            continue
        digits += 1
        if c.classes == t.classes and c.axis == t.axis:
            relation += 1
            exact += c.sizes == t.sizes
    n = max(1, len(truth))
    return {"digits_right": digits / n, "relation_right": relation / n, "exact": exact / n}


def captions_of(scenes: Scenes, large: float) -> tuple[list[list[str]], list[Layout]]:
    """Five captions and the layout of every scene."""
    canvas = scenes.images.shape[-1]
    layouts = [layout_of(b, lab, canvas, large) for b, lab in zip(scenes.boxes, scenes.labels)]
    return [describe(t, scenes.classes) for t in layouts], layouts
