"""Text classifiers: (ids (B, T) padded with 0, lengths (B,)) -> logits (B, classes).

    rnn(...)        word embeddings, an LSTM or GRU (layers, bidirectional, dropout), the last state or the
                    mean or max over time, a dense layer: the course notes' network
    text_cnn(...)   Kim (2014): 1-D convolutions of several widths over the embeddings, max over time
    bag(...)        fastText (Joulin et al., 2016): the mean of the words' (and, with `bigram_buckets`, the
                    hashed word bigrams') embeddings (`nn.EmbeddingBag`), a linear layer; `hidden=true` puts a
                    ReLU between them: a wide MLP on the bag of words
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lab.errors import LabError
from text.data import PAD


def _reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each sequence of (B, T, F) reversed within its own length, the padding left at the end."""
    t = torch.arange(x.shape[1], device=x.device)
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, idx[..., None].expand_as(x))


class RNNClassifier(nn.Module):
    """Runs on the padded batch, not a packed one (on CPUs a packed LSTM is about 4x slower per step): outputs
    before a text's length never see its padding, and the backward direction reads each text reversed within
    its length, so every text's scores are exactly its own."""

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 32, hidden: int = 64,
                 cell: str = "lstm", layers: int = 1, bidirectional: bool = False, dropout: float = 0.0,
                 pool: str = "last"):
        super().__init__()
        cells = {"lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in cells:
            raise LabError(f"model.cell={cell!r} is unknown; use lstm or gru")
        if pool not in ("last", "mean", "max"):
            raise LabError(f"model.pool={pool!r} is unknown; use last, mean or max")
        self.pool, self.directions = pool, 2 if bidirectional else 1
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        width = hidden * self.directions
        self.rnns = nn.ModuleList(nn.ModuleList(cells[cell](embed_dim if i == 0 else width, hidden, batch_first=True)
                                                for _ in range(self.directions)) for i in range(int(layers)))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.to(ids.device)
        x = self.drop(self.embed(ids))
        for i, layer in enumerate(self.rnns):
            outs = [layer[0](x)[0]]
            if self.directions == 2:
                outs.append(_reverse_within(layer[1](_reverse_within(x, lengths))[0], lengths))
            x = torch.cat(outs, 2)
            if i < len(self.rnns) - 1:
                x = self.drop(x)
        if self.pool == "last":  # forward: the state at the last word; backward: the state at the first
            last = (lengths - 1)[:, None, None].expand(-1, 1, x.shape[2])
            z = x.gather(1, last)[:, 0]
            if self.directions == 2:
                h = x.shape[2] // 2
                z = torch.cat([z[:, :h], x[:, 0, h:]], 1)
        else:
            mask = (torch.arange(x.shape[1], device=ids.device) < lengths[:, None])[..., None]
            if self.pool == "mean":
                z = (x * mask).sum(1) / lengths[:, None].clamp(min=1)
            else:
                z = x.masked_fill(~mask, float("-inf")).amax(1)
        return self.head(self.drop(z))


def rnn(vocab_size: int, num_classes: int, embed_dim: int = 32, hidden: int = 64, cell: str = "lstm",
        layers: int = 1, bidirectional: bool = False, dropout: float = 0.0, pool: str = "last") -> RNNClassifier:
    return RNNClassifier(vocab_size, num_classes, embed_dim, hidden, cell, layers, bidirectional, dropout, pool)


class TextCNN(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 128,
                 kernel_sizes: Sequence[int] = (3, 4, 5), channels: int = 100, dropout: float = 0.5):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, channels, int(k), padding=int(k) - 1) for k in kernel_sizes)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(channels * len(self.convs), num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(1, 2)  # (B, E, T); padding k-1 on both sides keeps one-word texts valid
        pooled = []
        for conv in self.convs:
            y = F.relu(conv(x))  # output j sees words j-k+1..j: those past length+k-2 see padding only
            end = lengths.to(ids.device) + conv.kernel_size[0] - 1
            past = torch.arange(y.shape[2], device=ids.device) >= end[:, None]
            pooled.append(y.masked_fill(past[:, None], float("-inf")).amax(2))
        z = torch.cat(pooled, 1)
        return self.head(self.drop(z))


def text_cnn(vocab_size: int, num_classes: int, embed_dim: int = 128, kernel_sizes: Sequence[int] = (3, 4, 5),
             channels: int = 100, dropout: float = 0.5) -> TextCNN:
    return TextCNN(vocab_size, num_classes, embed_dim, kernel_sizes, channels, dropout)


class BagOfEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int | None = 64, bigram_buckets: int = 0,
                 weighting: str = "mean", hidden: bool = False, dropout: float = 0.0):
        super().__init__()
        if weighting not in ("mean", "tfidf"):
            raise LabError(f"model.weighting={weighting!r} is unknown; use mean or tfidf")
        if embed_dim is None and (hidden or dropout):
            raise LabError("model.embed_dim=null is a linear model on the bag (a score per topic and term), which "
                           "has no hidden layer or dropout; set model.hidden=false and model.dropout=0, or give "
                           "an embed_dim")
        self.vocab_size, self.buckets, self.hidden = vocab_size, int(bigram_buckets), bool(hidden)
        self.weighting = weighting
        self.embed = nn.EmbeddingBag(vocab_size + self.buckets, embed_dim or num_classes,
                                     mode="mean" if weighting == "mean" else "sum", padding_idx=PAD)
        self.register_buffer("idf", torch.ones(vocab_size + self.buckets))
        self.drop = nn.Dropout(dropout)
        if embed_dim is None:  # linear: each term's row holds its topic scores; zeros, as a linear SVM starts
            nn.init.zeros_(self.embed.weight)
            self.head: nn.Module = Bias(num_classes)
        else:
            self.head = nn.Linear(embed_dim, num_classes)

    def terms(self, ids: torch.Tensor) -> torch.Tensor:
        """The words' ids and, with bigram buckets, the word pairs' (hashed after the vocabulary); PAD elsewhere."""
        if not self.buckets or ids.shape[1] < 2:
            return ids
        a, b = ids[:, :-1], ids[:, 1:]
        pairs = self.vocab_size + (a * 1_000_003 + b) % self.buckets
        return torch.cat([ids, pairs.masked_fill((a == PAD) | (b == PAD), PAD)], 1)

    @staticmethod
    def _distinct(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's terms sorted, and a mask of the first copy of each term (PAD never counts)."""
        terms = terms.sort(1).values
        first = torch.ones_like(terms, dtype=torch.bool)
        first[:, 1:] = terms[:, 1:] != terms[:, :-1]
        return terms, first & (terms != PAD)

    @torch.no_grad()
    def fit_idf(self, ids: torch.Tensor, batch: int = 512) -> None:
        """Inverse document frequencies from the training texts' ids (N, T), as scikit-learn's smoothed idf:
        ln((1 + N) / (1 + df)) + 1; 0 for a term no training text has (a test text's new bigram, `<unk>` when
        nothing is cut), so that it neither scores nor dilutes the others' weights, as scikit-learn drops it."""
        df = torch.zeros_like(self.idf)
        for i in range(0, len(ids), batch):
            terms, first = self._distinct(self.terms(ids[i: i + batch].to(self.idf.device)))
            df.index_add_(0, terms[first], torch.ones(int(first.sum()), device=df.device))
        self.idf.copy_(torch.where(df > 0, torch.log((1 + len(ids)) / (1 + df)) + 1, 0.0))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        terms = self.terms(ids)
        if self.weighting == "mean":  # the mean of the embeddings: a linear map of the normalised bag of words
            z = self.embed(terms)
        else:  # each distinct term once, weighted by (1 + ln count) x idf, the weights scaled to unit length
            terms, first = self._distinct(terms)
            run = first.cumsum(1).sub(1).clamp(min=0)  # which distinct term each position repeats
            counts = torch.zeros(terms.shape, device=terms.device).scatter_add_(1, run, (terms != PAD).float())
            w = torch.where(first, (1 + counts.gather(1, run).clamp(min=1).log()) * self.idf[terms], 0.0)
            z = self.embed(terms, per_sample_weights=w / w.norm(dim=1, keepdim=True).clamp(min=1e-12))
        return self.head(self.drop(F.relu(z) if self.hidden else z))


class Bias(nn.Module):
    """Adds a learned bias per output (the linear bag's intercepts)."""

    def __init__(self, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


def bag(vocab_size: int, num_classes: int, embed_dim: int | None = 64, bigram_buckets: int = 0,
        weighting: str = "mean", hidden: bool = False, dropout: float = 0.0) -> BagOfEmbeddings:
    """fastText (`hidden=false`: linear in the bag of words and bigrams), or with `hidden=true` a ReLU on the
    bag's embedding before the output layer: a wide one-hidden-layer MLP on the bag of words (Galke and Scherp,
    2022). `weighting=tfidf` sums the distinct terms' embeddings weighted by their TF-IDF (scikit-learn's with
    sublinear tf: (1 + ln count) x idf, L2-normalised), instead of averaging every word's. `embed_dim=null`
    makes it linear in the bag itself (a score per topic and term, plus a bias): with `weighting=tfidf`, the
    task's `loss=squared_hinge` and an L2 penalty of 1/N (`optimizer=adam`, `weight_decay`), that is the
    objective of scikit-learn's LinearSVC at C=1."""
    return BagOfEmbeddings(vocab_size, num_classes, embed_dim, bigram_buckets, weighting, hidden, dropout)
