"""Text classification data: labelled documents, a vocabulary built from the training split, and batches of
token ids grouped by length.

    from text import data
    train, test = data.from_config(cfg.data, "train"), data.from_config(cfg.data, "test")   # Documents
    vocab = data.Vocabulary.build(train.tokens, size=10_000, min_freq=1)
    ids = [vocab.encode(t, max_len=500) for t in train.tokens]

Files (`../shared/data/text/`, or any path):

- Ana Cachopo's single-label format, one document a line, `topic<TAB>text`, plain or gzipped: Reuters-21578
  R8 and R52 (`data=reuters data.subset=r8|r52`) and 20 Newsgroups (`data=newsgroups`), the files
  `{r8,r52,20ng}-{train,test}-all-terms.txt.gz`;
- a CSV with a header (`data=text_folder data.path=FILE.csv data.text_column=... data.label_column=...`);
- a user's folder (`data=text_folder data.path=DIR`) holding `train.{txt,tsv,csv}[.gz]` and `test.*`.

Text is lower-cased (`data.lowercase`) and cut into words (runs of letters and digits): the Cachopo files,
already lower-cased and letters only, are split on spaces exactly. Labels are the training split's topics,
sorted. A line without a tab, an empty text and a test topic that training never saw each stop the run with
one line naming the file and line (`data.skip_bad=true`: skipped and counted in `Documents.skipped`).
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lab.data import default_root
from lab.errors import LabError

PAD, UNK = 0, 1  # the ids of the padding and the unknown-word tokens
SPECIALS = ("<pad>", "<unk>")
SETS = {"reuters": {"r8": "r8", "r52": "r52"}, "newsgroups": {"20ng": "20ng", None: "20ng"}}
SUFFIXES = (".txt", ".tsv", ".csv")
_WORD = re.compile(r"[^\W_]+")


@dataclass
class Documents:
    tokens: list[list[str]]  # each document's words
    labels: list[int]  # indices into classes
    classes: tuple[str, ...]
    source: str  # the file read
    skipped: dict[str, int] = field(default_factory=dict)  # problem -> lines skipped (data.skip_bad)


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    return _WORD.findall(text.lower() if lowercase else text)


def _open(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="") if path.suffix == ".gz" else \
        open(path, encoding="utf-8", errors="replace", newline="")
    return raw


def _rows(path: Path, text_column: str | None, label_column: str | None) -> Iterator[tuple[int, str | None, str]]:
    """(line number, label or None when the line has none, text) for every non-blank line of a file."""
    is_csv = path.name.removesuffix(".gz").endswith(".csv")
    with _open(path) as f:
        if not is_csv:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                label, tab, text = line.partition("\t")
                yield (n, label.strip(), text) if tab else (n, None, line)
            return
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for want, key in ((text_column, "text_column"), (label_column, "label_column")):
            if want not in cols:
                raise LabError(f"{path}: no column {want!r} (it has {', '.join(cols) or 'no header'}); set "
                               f"data.{key} to one of them")
        for row in reader:
            yield reader.line_num, (row[label_column] or "").strip() or None, row[text_column] or ""


def read(path: str | Path, classes: Sequence[str] | None = None, lowercase: bool = True, skip_bad: bool = False,
         text_column: str | None = "text", label_column: str | None = "label") -> Documents:
    """The documents of one file; `classes` (the training split's) fixes the label indices of a test file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LabError(f"{path} does not exist; set data.path (or data.root) to the folder of the text files")
    tokens, names, skipped = [], [], Counter()

    def bad(n: int, problem: str, fix: str) -> None:
        if not skip_bad:
            raise LabError(f"{path}:{n}: {problem}; {fix}, or set data.skip_bad=true to skip such lines")
        skipped[problem.split(":")[0]] += 1

    for n, label, text in _rows(path, text_column, label_column):
        if label is None:
            bad(n, "no topic (a line is topic<TAB>text)", "fix the line")
            continue
        words = tokenize(text, lowercase)
        if not words:
            bad(n, f"empty text (topic {label!r})", "remove the line")
            continue
        if classes is not None and label not in classes:
            bad(n, f"topic {label!r} never occurs in the training split", "drop the line or add training texts")
            continue
        tokens.append(words)
        names.append(label)
    if not tokens:
        raise LabError(f"{path} holds no labelled text; a line is topic<TAB>text (or a CSV with text and label "
                       "columns)")
    classes = tuple(classes) if classes is not None else tuple(sorted(set(names)))
    index = {c: i for i, c in enumerate(classes)}
    return Documents(tokens, [index[c] for c in names], classes, str(path), dict(skipped))


def find(d: Mapping[str, Any], split: str) -> Path:
    """The file of `split` for a data config: a named set under the root, or `data.path` (a file or a folder)."""
    name = d.get("name")
    if name in SETS:
        subset = d.get("subset")
        if subset not in SETS[name]:
            raise LabError(f"data.subset={subset!r} is not one of {', '.join(str(s) for s in SETS[name] if s)} "
                           f"for data={name}")
        root = Path(d.get("root") or default_root()).expanduser()
        stem = f"{SETS[name][subset]}-{split}-all-terms.txt"
        for folder in (root / "text", root):
            for f in (folder / f"{stem}.gz", folder / stem):
                if f.is_file():
                    return f
        raise LabError(f"{stem}[.gz] is not under {root}/text; put Ana Cachopo's {name} files there (see "
                       "docs/text.md) or set data.root")
    if not d.get("path"):
        raise LabError(f"data={name} needs data.path=FILE or DIR (a folder with train.txt and test.txt)")
    path = Path(str(d.get("test_path") if split == "test" and d.get("test_path") else d["path"])).expanduser()
    if path.is_dir():
        for stem in (split, "val") if split == "test" else (split,):
            for f in (path / f"{stem}{suffix}{gz}" for suffix in SUFFIXES for gz in ("", ".gz")):
                if f.is_file():
                    return f
        raise LabError(f"{path} has no {split}.txt, {split}.tsv or {split}.csv (optionally .gz)")
    if split == "test" and not d.get("test_path"):
        raise LabError(f"data.path={path} is one file: set data.test_path=FILE too, or point data.path at a folder "
                       "with train.* and test.*")
    return path


def from_config(d: Mapping[str, Any], split: str, classes: Sequence[str] | None = None) -> Documents:
    docs = read(find(d, split), classes, bool(d.get("lowercase", True)), bool(d.get("skip_bad", False)),
                d.get("text_column", "text"), d.get("label_column", "label"))
    cut = d.get(f"n_{split}")  # the first N documents (smoke tests)
    if cut:
        docs.tokens, docs.labels = docs.tokens[: int(cut)], docs.labels[: int(cut)]
    return docs


class Vocabulary:
    """Words by id: 0 padding, 1 unknown, then the training split's words from most to least frequent (ties by
    first appearance), at most `size` in all, each seen at least `min_freq` times."""

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise LabError(f"a vocabulary starts with {SPECIALS}; this one starts with {tuple(words[:2])}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, documents: Sequence[Sequence[str]], size: int | None = None, min_freq: int = 1) -> Vocabulary:
        counts = Counter(w for doc in documents for w in doc)
        keep = [w for w, c in counts.most_common() if c >= min_freq]
        if size is not None:
            if size <= len(SPECIALS):
                raise LabError(f"data.vocab_size={size} leaves no room for words; use e.g. 10000")
            keep = keep[: size - len(SPECIALS)]
        return cls([*SPECIALS, *keep])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: Sequence[str], max_len: int | None = None) -> list[int]:
        """Word ids, the unknown id for a word outside the vocabulary, the end cut past `max_len` words."""
        ids = [self.index.get(w, UNK) for w in words]
        return ids[:max_len] if max_len else ids

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.words[i] for i in ids if i != PAD]


def unknown_share(encoded: Sequence[Sequence[int]]) -> float:
    total = sum(len(e) for e in encoded)
    return sum(i == UNK for e in encoded for i in e) / max(1, total)


def pad(encoded: Sequence[Sequence[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded at the end with PAD to `length` (default: the longest), and the (B,) lengths."""
    lengths = torch.tensor([max(1, len(e)) for e in encoded])
    t = int(length or lengths.max())
    out = torch.full((len(encoded), t), PAD, dtype=torch.long)
    for i, e in enumerate(encoded):
        out[i, : min(len(e), t)] = torch.tensor(e[:t], dtype=torch.long)
    return out, lengths.clamp(max=t)


def length_batches(lengths: torch.Tensor, batch_size: int, pool: int, g: torch.Generator) -> list[torch.Tensor]:
    """Positions 0..n-1 (already shuffled items, `lengths` theirs) cut into batches in which similar lengths go
    together: each run of `pool` batches is sorted by length, longest first, and cut; the one short batch left
    at the end is dropped; the batches come back in an order drawn from `g`."""
    span, batches = batch_size * pool, []
    for start in range(0, len(lengths), span):
        chunk = torch.arange(start, min(start + span, len(lengths)))
        batches += list(chunk[torch.argsort(lengths[chunk], descending=True, stable=True)].split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()  # drop the one short batch, as the image loaders do
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


class BucketLoader:
    """Batches of (ids (B, T), lengths (B,), labels (B,)) in which texts of similar length go together: each
    epoch shuffles the documents, sorts each pool of `pool` batches by length, cuts the pools into batches and
    shuffles the batches, so every batch is padded only to its own longest text. One shard per DDP rank."""

    def __init__(self, encoded: Sequence[Sequence[int]], labels: Sequence[int], batch_size: int,
                 device: torch.device | str = "cpu", seed: int = 0, pool: int = 50, rank: int = 0,
                 world_size: int = 1):
        self.ids, self.lengths = pad(encoded)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.batch_size, self.pool, self.seed, self.epoch = int(batch_size), int(pool), seed, 0
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, len(range(self.rank, len(self.labels), self.world_size)) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.labels), generator=g)
        order = order[self.rank:: self.world_size] if self.world_size > 1 else order
        for rows in length_batches(self.lengths[order], self.batch_size, self.pool, g):
            b = order[rows]
            t = int(self.lengths[b].max())
            yield (self.ids[b, :t].to(self.device, non_blocking=True), self.lengths[b].to(self.device),
                   self.labels[b].to(self.device))
