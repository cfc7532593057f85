"""Topic classification of R8, R52 and 20 Newsgroups: the lab's best text model over several seeds and the
course notes' RNN, against scikit-learn's TF-IDF + logistic regression and a plain PyTorch loop, same splits.

    python benchmarks/text_topics.py                         # every set, every side
    python benchmarks/text_topics.py --sets r8 --seeds 0     # one set, one seed
    python benchmarks/text_topics.py --sets r8 r52 --rnn-seeds 0 1 2 --name text_topics_rnn_seeds
                                                             # the RNN and its plain loop over 3 seeds too

1. The lab: its best model, `python -m lab +experiment=text_reuters_svm|text_20ng_svm logger=none
   trainer.progress=false` (a linear SVM on TF-IDF; `--best` adds overrides) per seed, and the notes' RNN,
   `+experiment=text_reuters|text_20ng` with `--rnn`, per `--rnn-seeds` (default: seed 0 alone); test accuracy
   and macro-F1 at the end, wall seconds of the whole process, median training texts/s.
2. scikit-learn: `TfidfVectorizer` (the lab's words, sublinear tf) + `LogisticRegression` (the table's TF-IDF
   row) and + `LinearSVC` (C=1, the objective the lab's best model optimises), on the same files.
3. A plain loop for the RNN: the same vocabulary, model, optimizer, schedule and epochs, but a shuffled
   `DataLoader` whose `collate_fn` pads every batch to its longest text, as tutorials do; the lab batches
   texts of similar length (text/data.py's BucketLoader). The ratio is the lab's training texts/s over the
   loop's, at the accuracy each reaches.

Writes benchmarks/results/<name>.json (default text_topics).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402

SETS = {"r8": ("text_reuters_svm", "text_reuters", ["data.subset=r8"]),  # best model's, RNN's experiment
        "r52": ("text_reuters_svm", "text_reuters", ["data.subset=r52"]),
        "20ng": ("text_20ng_svm", "text_20ng", [])}
TARGETS = {"r8": 0.975, "r52": 0.940, "20ng": 0.85}  # test accuracy of the lab's best model
BILSTM = {"r8": 0.9631, "r52": 0.9054, "20ng": 0.7318}  # Yao et al. 2019, table 2: the RNN's bar
BUDGET_S = 180


def lab_run(args: list[str], run_dir: Path) -> dict[str, Any]:
    rows, wall = record.run_lab(args, run_dir)
    final = [r for r in rows if "eval/accuracy" in r][-1]
    info = next(r for r in rows if "data/vocab_size" in r)
    return {"accuracy": round(final["eval/accuracy"], 4), "macro_f1": round(final["eval/macro_f1"], 4),
            "wall_s": round(wall, 1), "train_texts_per_s_median": record.median_samples_per_s(rows),
            "vocab_size": info["data/vocab_size"], "unknown_share_test": round(info["data/unknown_share_test"], 4)}


def tfidf_peers(cfg: Any) -> dict[str, dict[str, Any]]:
    """TF-IDF of the lab's words (every training word) + logistic regression (C=10) and + LinearSVC (C=1)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    from text import data

    train = data.from_config(cfg.data, "train")
    test = data.from_config(cfg.data, "test", classes=train.classes)
    t0 = time.perf_counter()
    vec = TfidfVectorizer(analyzer=lambda words: words, sublinear_tf=True)
    x, x_test = vec.fit_transform(train.tokens), vec.transform(test.tokens)
    vectorize_s, out = time.perf_counter() - t0, {}
    for name, clf in (("tfidf_logistic_regression", LogisticRegression(C=10.0, max_iter=1000)),
                      ("tfidf_linear_svc", LinearSVC(C=1.0))):
        t0 = time.perf_counter()
        pred = clf.fit(x, train.labels).predict(x_test)
        acc = float((pred == torch.tensor(test.labels).numpy()).mean())
        out[name] = {"accuracy": round(acc, 4), "train_s": round(vectorize_s + time.perf_counter() - t0, 1),
                     "C": clf.C, "features": x.shape[1]}
    return out


def plain_rnn(cfg: Any) -> dict[str, Any]:
    """The same RNN trained by a tutorial's loop: a DataLoader padding each random batch to its longest text."""
    from lab.config import build
    from lab.optim import build_optimizer, build_scheduler
    from text import data

    d = cfg.data
    train = data.from_config(d, "train")
    test = data.from_config(d, "test", classes=train.classes)
    vocab = data.Vocabulary.build(train.tokens, d.vocab_size, int(d.min_freq))
    max_len = int(d.max_len) if d.max_len else None
    items = [(vocab.encode(t, max_len), y) for t, y in zip(train.tokens, train.labels)]

    def collate(batch):
        ids, lengths = data.pad([b[0] for b in batch])
        return ids, lengths, torch.tensor([b[1] for b in batch])

    loader = torch.utils.data.DataLoader(items, batch_size=int(d.batch_size), shuffle=True, drop_last=True,
                                         collate_fn=collate)
    torch.manual_seed(int(cfg.seed))
    model = build(cfg.model, "model", vocab_size=len(vocab), num_classes=len(train.classes))
    opt = build_optimizer(cfg.optimizer, model.parameters())
    epochs = int(cfg.trainer.max_epochs)
    sched = build_scheduler(cfg.scheduler, opt, epochs * len(loader))
    model.train()
    seen, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for ids, lengths, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(ids, lengths), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(labels)
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test.labels), 256):
            ids, lengths = data.pad([vocab.encode(t, max_len) for t in test.tokens[i: i + 256]])
            correct += int((model(ids, lengths).argmax(1) == torch.tensor(test.labels[i: i + 256])).sum())
    return {"epochs": epochs, "train_s": round(train_s, 1), "train_texts_per_s": round(seen / train_s, 2),
            "accuracy": round(correct / len(test.labels), 4)}


def mean_of(runs: dict[int, dict[str, Any]], speed: str) -> dict[str, Any]:
    """One seed's figures as they are; several seeds' as `seeds`, with the mean (and sd) accuracy and speed."""
    if len(runs) == 1:
        return next(iter(runs.values()))
    accs = [r["accuracy"] for r in runs.values()]
    mean = {k: round(statistics.mean(r[k] for r in runs.values()), 4) for k in ("accuracy", "macro_f1")
            if all(k in r for r in runs.values())}
    return {"seeds": runs, **mean, "accuracy_sd": round(statistics.stdev(accs), 4),
            speed: round(statistics.mean(r[speed] for r in runs.values()), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--best", nargs="*", default=[], help="overrides naming the lab's best model (default: the "
                                                           "experiment's own)")
    ap.add_argument("--rnn", nargs="*", default=["model=lstm", "model.bidirectional=true", "model.hidden=128",
                                                 "model.pool=max", "optimizer.lr=1e-2"],
                    help="overrides for the notes' RNN")
    ap.add_argument("--rnn-seeds", nargs="*", type=int, default=[0],
                    help="seeds of the RNN and of its plain loop (accuracy and texts/s are then their means)")
    ap.add_argument("--no-peers", action="store_true", help="skip scikit-learn and the plain loop")
    ap.add_argument("--name", default="text_topics")
    args = ap.parse_args()
    figures: dict[str, Any] = {"targets": TARGETS, "bilstm_published": BILSTM, "budget_s": BUDGET_S,
                               "best_args": args.best, "rnn_args": args.rnn, "rnn_seeds": args.rnn_seeds, "sets": {}}
    with tempfile.TemporaryDirectory(prefix="lab-text-") as tmp:
        work = Path(tmp)
        for name in args.sets:
            experiment, rnn_experiment, extra = SETS[name]
            base = [f"+experiment={experiment}", "logger=none", "trainer.progress=false", *extra]
            rnn_base = [f"+experiment={rnn_experiment}", *base[1:]]
            out: dict[str, Any] = {"command": " ".join(["python -m lab", *base, *args.best]), "seeds": {}}
            for s in args.seeds:
                out["seeds"][s] = lab_run([*base, *args.best, f"seed={s}"], work / f"{name}_{s}")
                print(json.dumps({name: {s: out["seeds"][s]}}), flush=True)
            accs = [r["accuracy"] for r in out["seeds"].values()]
            out["accuracy_mean"] = round(statistics.mean(accs), 4)
            out["accuracy_sd"] = round(statistics.stdev(accs), 4) if len(accs) > 1 else None
            out["macro_f1_mean"] = round(statistics.mean(r["macro_f1"] for r in out["seeds"].values()), 4)
            out["wall_s_max"] = max(r["wall_s"] for r in out["seeds"].values())
            out["meets_target"] = out["accuracy_mean"] >= TARGETS[name] and out["wall_s_max"] <= BUDGET_S
            rnn_args = [*rnn_base, *args.rnn]
            runs = {s: lab_run([*rnn_args, f"seed={s}"], work / f"{name}_rnn_{s}") for s in args.rnn_seeds}
            out["rnn"] = {"command": " ".join(["python -m lab", *rnn_args]),
                          **mean_of(runs, "train_texts_per_s_median")}
            out["rnn"]["at_least_bilstm_row"] = out["rnn"]["accuracy"] >= BILSTM[name]
            print(json.dumps({name: {"rnn": out["rnn"]}}), flush=True)
            if not args.no_peers:
                out.update(tfidf_peers(record.composed(base)))
                plain = {s: plain_rnn(record.composed([*rnn_args, f"seed={s}"])) for s in args.rnn_seeds}
                out["plain_rnn_loop"] = mean_of(plain, "train_texts_per_s")
                out["rnn_texts_per_s_ratio_lab_over_plain"] = round(
                    out["rnn"]["train_texts_per_s_median"] / out["plain_rnn_loop"]["train_texts_per_s"], 3)
                out["rnn_accuracy_lab_minus_plain"] = round(
                    out["rnn"]["accuracy"] - out["plain_rnn_loop"]["accuracy"], 4)
                print(json.dumps({name: {k: out[k] for k in ("tfidf_logistic_regression", "tfidf_linear_svc",
                                                              "plain_rnn_loop")}}),
                      flush=True)
            figures["sets"][name] = out
            record.write(args.name, {**figures, "complete": False})
    record.write(args.name, {**figures, "complete": True})


if __name__ == "__main__":
    main()
