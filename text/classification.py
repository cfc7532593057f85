"""Text classification: a topic per document, cross-entropy (or a squared hinge) on word ids batched by length
on the device.

Config: `data` (text/data.py: the files, `vocab_size`, `min_freq`, `max_len`, `batch_size`, `bucket_pool`),
`model` (text/models.py: `rnn`, `text_cnn` or `bag`; built with vocab_size and num_classes), `optimizer`,
`scheduler`, `loss` (cross_entropy, or squared_hinge: one-vs-rest, as LinearSVC), `label_smoothing`. The
vocabulary comes from the training split only; it is saved in every checkpoint (and as `vocab.json` in the run
directory), so `mode=eval` and `mode=predict` read text exactly as training did. Logs test accuracy and
macro-F1 (torchmetrics); each evaluation a table of misclassified test texts; the confusion matrix (CSV every
evaluation; the last one as a row-normalised PNG); once, the vocabulary size, the share of unknown words and of
texts cut at `max_len`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lab import io
from lab.config import build
from lab.errors import LabError
from lab.optim import build_optimizer, build_scheduler
from lab.plots import confusion_figure
from lab.task import RunContext, Task
from text import data

LOSSES = ("cross_entropy", "squared_hinge")


class TextClassification(Task):
    main_metric = "eval/accuracy"
    main_mode = "max"
    progress_keys = ("loss", "accuracy")

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.loss = str(cfg.get("loss", "cross_entropy"))
        self.smoothing = float(cfg.get("label_smoothing", 0.0))
        if self.loss not in LOSSES:
            raise LabError(f"loss={self.loss!r} is unknown; use one of {', '.join(LOSSES)}")
        if self.loss == "squared_hinge" and self.smoothing:
            raise LabError(f"label_smoothing={self.smoothing} applies to loss=cross_entropy only; set "
                           "label_smoothing=0 for loss=squared_hinge")
        d = cfg.data
        train = data.from_config(d, "train")
        test = data.from_config(d, "test", classes=train.classes)
        self.classes, self.test_docs = train.classes, test
        self.max_len = int(d.max_len) if d.get("max_len") else None
        self.vocab = data.Vocabulary.build(train.tokens, d.get("vocab_size"), int(d.get("min_freq", 1)))
        encoded = [self.vocab.encode(t, self.max_len) for t in train.tokens]
        self.loader = data.BucketLoader(encoded, train.labels, int(d.batch_size), ctx.device, seed=ctx.seed,
                                        pool=int(d.get("bucket_pool", 50)), rank=ctx.dist.rank,
                                        world_size=ctx.dist.world_size)
        self._encode_test()
        self.eval_batch_size = int(d.eval_batch_size)
        self.model = build(cfg.model, "model", vocab_size=len(self.vocab), num_classes=len(self.classes))
        if callable(getattr(self.model, "fit_idf", None)):  # a TF-IDF bag: document frequencies of training
            self.model.fit_idf(self.loader.ids)
        words = len({w for t in train.tokens for w in t})
        cut = sum(len(t) > self.max_len for t in train.tokens) / len(train.tokens) if self.max_len else 0.0
        params = sum(p.numel() for p in self.model.parameters())
        self.info = {"model/params": params, "data/train_texts": len(train.labels),
                     "data/test_texts": len(test.labels), "data/classes": len(self.classes),
                     "data/vocab_size": len(self.vocab), "data/train_words": words,
                     "data/unknown_share_train": data.unknown_share(encoded),
                     "data/unknown_share_test": self.unknown_test, "data/cut_share_train": cut,
                     **{f"data/skipped_{split}": sum(s.skipped.values()) for split, s in (("train", train),
                                                                                          ("test", test))}}
        if ctx.dist.is_main and ctx.mode == "train":
            print(f"[lab] {len(train.labels):,} training and {len(test.labels):,} test texts, {len(self.classes)} "
                  f"topics; vocabulary {len(self.vocab):,} of {words:,} training words; unknown words "
                  f"{self.info['data/unknown_share_train']:.1%} of training and {self.unknown_test:.1%} of test "
                  f"tokens; " + (f"{cut:.1%} of training texts cut at {self.max_len} words" if self.max_len
                                        else "texts kept whole (data.max_len=null)"), flush=True)
            for split, s in (("training", train), ("test", test)):
                if s.skipped:
                    print(f"[lab] skipped {split} lines (data.skip_bad): "
                          + ", ".join(f"{n} {k}" for k, n in s.skipped.items()), flush=True)
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            io.write_text(ctx.run_dir / "model.txt", f"{self.model}\n\nparameters: {params:,}\n")
            io.write_json(ctx.run_dir / "vocab.json", {"classes": list(self.classes), "words": self.vocab.words})
        self.confusion: tuple[int, torch.Tensor] | None = None

    def _encode_test(self) -> None:
        encoded = [self.vocab.encode(t, self.max_len) for t in self.test_docs.tokens]
        self.unknown_test = data.unknown_share(encoded)
        self.test_encoded = encoded
        self.test_labels = torch.tensor(self.test_docs.labels)

    # The vocabulary and the topics travel in every checkpoint (state_dict's "_extra_state").
    def get_extra_state(self) -> dict[str, Any]:
        return {"words": self.vocab.words, "classes": list(self.classes)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if list(state["classes"]) != list(self.classes):
            raise LabError(f"the checkpoint was trained on the topics {state['classes'][:5]}..., this data has "
                           f"{list(self.classes)[:5]}...; evaluate it on the data set it was trained on")
        if state["words"] != self.vocab.words:
            self.vocab = data.Vocabulary(state["words"])
            self._encode_test()

    def optimizers(self, total_steps: int | None) -> dict:
        opt = build_optimizer(self.cfg.optimizer, self.model.parameters())
        return {"model": (opt, build_scheduler(self.cfg.get("scheduler"), opt, total_steps))}

    def train_data(self) -> data.BucketLoader:
        return self.loader

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], optim) -> dict:
        ids, lengths, labels = batch
        logits = self.model(ids, lengths).float()
        loss = self.criterion(logits, labels)
        optim.step("model", loss)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean()}

    def criterion(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss == "cross_entropy":
            return F.cross_entropy(scores, labels, label_smoothing=self.smoothing)
        target = F.one_hot(labels, scores.shape[1]).float() * 2 - 1  # +1 for the topic, -1 for every other
        return F.relu(1 - target * scores).square().sum(1).mean()

    @property
    def confidence(self) -> str:
        """What `classify` gives per topic: a softmax probability, or for a hinge loss the raw margin score."""
        return "probability" if self.loss == "cross_entropy" else "score"

    def classify(self, encoded: list[list[int]]) -> torch.Tensor:
        """(N, classes) probabilities (`loss=squared_hinge`: scores), the texts batched longest first so each
        batch pads little."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        probs = torch.empty(len(encoded), len(self.classes))
        for i in range(0, len(order), self.eval_batch_size):
            idx = order[i: i + self.eval_batch_size]
            ids, lengths = data.pad([encoded[j] for j in idx])
            logits = self.model(ids.to(self.ctx.device), lengths.to(self.ctx.device)).float()
            probs[idx] = (logits.softmax(1) if self.loss == "cross_entropy" else logits).cpu()
        return probs

    def evaluate(self) -> dict:
        from torchmetrics.functional.classification import multiclass_f1_score

        if "data/vocab_size" not in self.ctx.logger.last:  # once per run, a resumed one included
            self.ctx.logger.log(self.info)
        k, y = len(self.classes), self.test_labels
        probs = self.classify(self.test_encoded)
        pred = probs.argmax(1)
        loss = (F.nll_loss(probs.clamp(min=1e-12).log(), y) if self.loss == "cross_entropy"
                else self.criterion(probs, y)).item()
        confusion = torch.bincount(y * k + pred, minlength=k * k).view(k, k)
        f1 = multiclass_f1_score(pred, y, num_classes=k, average="macro").item()
        self.confusion = (self.ctx.logger.step, confusion)  # drawn once, for the last evaluation, by close()
        self.ctx.logger.log_table("eval/confusion_matrix", ["topic \\ prediction", *self.classes],
                                  [[c, *row] for c, row in zip(self.classes, confusion.tolist())])
        wrong = (pred != y).nonzero().flatten()[: int(self.cfg.get("misclassified_rows", 50))].tolist()
        self.ctx.logger.log_table(
            "eval/misclassified", ["text (first words)", "topic", "prediction", self.confidence],
            [[" ".join(self.test_docs.tokens[i][:30]), self.classes[y[i]], self.classes[pred[i]],
              round(float(probs[i, pred[i]]), 4)] for i in wrong])
        return {"loss": loss, "accuracy": (pred == y).float().mean().item(), "macro_f1": f1}

    def close(self) -> None:
        if self.confusion is not None:
            step, confusion = self.confusion
            figure = confusion_figure(confusion, self.classes, "topic")
            self.ctx.logger.log_image("eval/confusion_matrix", figure, step=step)
            self.confusion = None

    def samples_in(self, batch: Any) -> int:
        return len(batch[2])

    def predict(self, path: Path) -> dict[str, Any]:
        """Label every line of the text file `path` (one text a line): <run dir>/predictions.tsv holds the line
        number, the predicted topic and its probability (`loss=squared_hinge`: its score)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise LabError(f"input={path} is not a file; pass input=FILE, a text file with one text a line")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        texts = [(n, data.tokenize(t, bool(self.cfg.data.get("lowercase", True)))) for n, t in enumerate(lines, 1)]
        texts = [(n, t) for n, t in texts if t]
        if not texts:
            raise LabError(f"input={path} holds no words; write one text a line")
        probs = self.classify([self.vocab.encode(t, self.max_len) for _, t in texts])
        best, pred = probs.max(1)
        rows = [f"line\ttopic\t{self.confidence}", *(f"{n}\t{self.classes[p]}\t{b:.4f}"
                                              for (n, _), p, b in zip(texts, pred.tolist(), best.tolist()))]
        out = self.ctx.run_dir / "predictions.tsv"
        io.write_text(out, "\n".join(rows) + "\n")
        counts = torch.bincount(pred, minlength=len(self.classes)).tolist()
        print(f"[lab] {len(texts)} texts labelled ({len(lines) - len(texts)} lines without words skipped): {out}",
              flush=True)
        return {"texts": len(texts), "predictions": str(out),
                "topics": {c: n for c, n in zip(self.classes, counts) if n}}

