"""The text family: the reader on both formats and on bad lines, the vocabulary, cut and pad, the models on
ragged batches, the length-bucketed loader, and a short R8 run that learns, then evaluates and predicts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from conftest import DATA, read_metrics, run_lab_cases, short_run
from lab.errors import LabError
from text import data, models

LINES = ["earn\tprofit rose to five mln dlrs", "acq\tcompany agreed to buy the unit", "earn\tnet profit fell",
         "grain\twheat exports rose"]


def _write(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_the_reader_takes_cachopo_lines_plain_or_gzipped_and_csv(tmp_path: Path) -> None:
    for name in ("a.txt", "a.txt.gz"):
        docs = data.read(_write(tmp_path / name, LINES))
        assert docs.classes == ("acq", "earn", "grain")
        assert docs.labels == [1, 0, 1, 2] and docs.tokens[0] == ["profit", "rose", "to", "five", "mln", "dlrs"]
    csv = tmp_path / "b.csv"
    csv.write_text('body,topic\n"Profit, rose!",earn\nBuys the Unit,acq\n')
    docs = data.read(csv, text_column="body", label_column="topic")
    assert docs.tokens == [["profit", "rose"], ["buys", "the", "unit"]] and docs.classes == ("acq", "earn")
    with pytest.raises(LabError, match="no column 'text'.*body, topic"):
        data.read(csv)
    test = data.read(_write(tmp_path / "t.txt", ["grain\tcorn", "earn\tloss"]), classes=docs.classes + ("grain",))
    assert test.labels == [2, 1]  # indices of the training split's topics


@pytest.mark.parametrize("line, problem", [("earn profit rose", r"a\.txt:2: no topic"),
                                           ("earn\t  ...  ", r"a\.txt:2: empty text"),
                                           ("cocoa\tprices", r"a\.txt:2: topic 'cocoa' never occurs in the training")])
def test_a_bad_line_stops_with_its_file_and_line_or_is_skipped_and_counted(tmp_path: Path, line: str,
                                                                           problem: str) -> None:
    path = _write(tmp_path / "a.txt", [LINES[0], line, LINES[1]])
    with pytest.raises(LabError, match=problem + ".*data.skip_bad=true"):
        data.read(path, classes=("acq", "earn"))
    docs = data.read(path, classes=("acq", "earn"), skip_bad=True)
    assert docs.labels == [1, 0] and sum(docs.skipped.values()) == 1


def test_the_named_sets_and_folders_resolve_to_their_files(tmp_path: Path) -> None:
    assert data.find({"name": "reuters", "subset": "r52", "root": str(DATA)}, "test").name == \
        "r52-test-all-terms.txt.gz"
    with pytest.raises(LabError, match="data.subset='r10' is not one of r8, r52"):
        data.find({"name": "reuters", "subset": "r10", "root": str(DATA)}, "train")
    _write(tmp_path / "train.tsv", LINES)
    _write(tmp_path / "val.txt.gz", LINES[:2])
    d = {"name": "text_folder", "path": str(tmp_path)}
    assert data.find(d, "train").name == "train.tsv" and data.find(d, "test").name == "val.txt.gz"
    with pytest.raises(LabError, match="set data.test_path=FILE"):
        data.find({"name": "text_folder", "path": str(tmp_path / "train.tsv")}, "test")


def test_the_vocabulary_keeps_the_most_frequent_words_and_maps_the_rest_to_unknown() -> None:
    docs = [["a", "b", "a", "c"], ["a", "b", "d"]]
    v = data.Vocabulary.build(docs, size=4)
    assert v.words == ["<pad>", "<unk>", "a", "b"]
    assert v.encode(["a", "d", "b", "zzz"]) == [2, data.UNK, 3, data.UNK]
    assert v.encode(["a", "b", "a", "b"], max_len=3) == [2, 3, 2]  # the end is cut
    assert data.Vocabulary.build(docs, min_freq=2).words == ["<pad>", "<unk>", "a", "b"]
    assert data.unknown_share([v.encode(d) for d in docs]) == pytest.approx(2 / 7)
    assert data.Vocabulary(list(v.words)).encode(["b", "c"]) == v.encode(["b", "c"])  # reloaded: same ids
    with pytest.raises(LabError, match="vocab_size=2 leaves no room"):
        data.Vocabulary.build(docs, size=2)


def test_pad_fills_the_end_and_cuts_to_a_length() -> None:
    ids, lengths = data.pad([[5, 6, 7], [8], [9, 9]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]] and lengths.tolist() == [3, 1, 2]
    ids, lengths = data.pad([[5, 6, 7], [8]], length=2)
    assert ids.tolist() == [[5, 6], [8, 0]] and lengths.tolist() == [2, 1]


def test_the_loader_covers_every_text_once_an_epoch_in_batches_of_similar_length() -> None:
    g = torch.Generator().manual_seed(0)
    encoded = [list(range(2, 2 + int(n))) for n in torch.randint(1, 300, (400,), generator=g)]
    loader = data.BucketLoader(encoded, list(range(400)), batch_size=20, pool=10)
    batches = list(loader)
    labels = torch.cat([b[2] for b in batches])
    assert len(batches) == len(loader) == 20 and sorted(labels.tolist()) == list(range(400))
    padded = sum(b[0].numel() for b in batches)
    assert padded < 1.1 * sum(len(e) for e in encoded)  # random batches of 20 pad to about 2x
    for ids, lengths, _ in batches:
        assert ids.shape[1] == lengths.max() and ((ids != 0).sum(1) == lengths).all()
    loader.set_epoch(1)
    assert torch.cat([b[2] for b in loader]).tolist() != labels.tolist()


@pytest.mark.parametrize("name, kw", [("rnn", {}), ("rnn", {"cell": "gru", "bidirectional": True, "pool": "mean"}),
                                      ("rnn", {"layers": 2, "bidirectional": True, "pool": "max", "dropout": 0.1}),
                                      ("text_cnn", {"kernel_sizes": [2, 5]}), ("bag", {"bigram_buckets": 50}),
                                      ("bag", {"hidden": True, "embed_dim": 16}),
                                      ("bag", {"weighting": "tfidf", "bigram_buckets": 50})])
def test_every_model_scores_a_ragged_batch_as_it_scores_each_text_alone(name: str, kw: dict) -> None:
    torch.manual_seed(0)
    model = getattr(models, name)(vocab_size=30, num_classes=4, **kw).eval()
    texts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    ids, lengths = data.pad(texts)
    with torch.no_grad():
        together = model(ids, lengths)
        alone = torch.cat([model(*data.pad([t])) for t in texts])
    assert together.shape == (3, 4)
    assert torch.allclose(together, alone, atol=1e-5)  # padding never changes a text's scores


def test_a_short_r8_run_learns_then_evaluates_and_predicts(tmp_path: Path) -> None:
    args = ["+experiment=text_reuters", "logger=none", "trainer.progress=false", "model=fasttext",
            "model.bigram_buckets=20000", "optimizer.lr=2e-2", "data.vocab_size=5000", "trainer.max_epochs=3",
            "trainer.eval_every=100000"]
    run, env, losses, evals = short_run(tmp_path, args, "eval/accuracy")
    assert losses[-1] < 0.5 * losses[0], losses
    assert evals[-1]["eval/accuracy"] > 0.495 + 0.3, evals[-1]  # always "earn": 49.5% of the test texts
    assert 0 < evals[-1]["eval/macro_f1"] <= 1
    info = next(r for r in read_metrics(run) if "data/vocab_size" in r)
    assert info["data/vocab_size"] == 5000 and 0 < info["data/unknown_share_test"] < 0.2
    assert json.loads((run / "vocab.json").read_text())["words"][:2] == ["<pad>", "<unk>"]
    table = sorted((run / "media").glob("eval_misclassified_*.csv"))[-1].read_text().splitlines()
    assert table[0] == "text (first words),topic,prediction,probability" and len(table) > 1
    assert any((run / "media").glob("eval_confusion_matrix_*.png"))

    inbox = tmp_path / "news.txt"
    inbox.write_text("shr profit net revenues dividend quarter\n\nwheat grain tonnes export corn harvest\n")
    checkpoint = run / "checkpoints" / "best.pt"
    pred, ev = tmp_path / "pred", tmp_path / "eval"
    predicted, evaluated = run_lab_cases(tmp_path, [
        [*args, "mode=predict", f"checkpoint={checkpoint}", f"input={inbox}", f"hydra.run.dir={pred}"],
        [*args, "mode=eval", f"checkpoint={checkpoint}", f"hydra.run.dir={ev}"]])
    assert predicted.returncode == 0 and evaluated.returncode == 0, predicted.stderr[-2000:] + evaluated.stderr[-2000:]
    rows = (pred / "predictions.tsv").read_text().splitlines()
    assert rows[0] == "line\ttopic\tprobability" and [r.split("\t")[:2] for r in rows[1:]] == [["1", "earn"],
                                                                                               ["3", "grain"]]
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["eval/accuracy"] == pytest.approx(max(r["eval/accuracy"] for r in evals), abs=1e-6)


def test_the_tfidf_bag_sees_what_scikit_learns_tfidf_vectorizer_makes() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [[2, 3, 3, 5], [2, 4], [4, 4, 6, 2, 3]]
    ids, lengths = data.pad(texts)
    model = models.bag(vocab_size=8, num_classes=3, embed_dim=4, weighting="tfidf")
    model.fit_idf(ids)
    vec = TfidfVectorizer(analyzer=lambda t: [str(i) for i in t], sublinear_tf=True)  # smoothed idf, L2 norm
    x = torch.tensor(vec.fit_transform(texts).toarray(), dtype=torch.float32)
    order = [int(w) for w in vec.get_feature_names_out()]
    assert torch.allclose(model.idf[order], torch.tensor(vec.idf_, dtype=torch.float32))
    with torch.no_grad():
        w = model.embed.weight[order]
        expected = model.head(x @ w)
        assert torch.allclose(model(ids, lengths), expected, atol=1e-5)


def test_the_linear_tfidf_bag_scores_as_a_linear_model_on_scikit_learns_features() -> None:
    """embed_dim=null: scores = TF-IDF(text) @ W + b, and a term no training text has (7 here) weighs nothing,
    as TfidfVectorizer.transform drops it."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    train, test = [[2, 3, 3, 5], [2, 4], [4, 4, 6, 2, 3]], [[3, 7, 7, 4], [7]]
    model = models.bag(vocab_size=8, num_classes=3, embed_dim=None, weighting="tfidf")
    assert not model.embed.weight.any()  # a linear SVM starts at zero
    model.fit_idf(data.pad(train)[0])
    with torch.no_grad():
        model.embed.weight.normal_()
        model.head.bias.normal_()
    vec = TfidfVectorizer(analyzer=lambda t: [str(i) for i in t], sublinear_tf=True).fit(train)
    order = [int(w) for w in vec.get_feature_names_out()]
    x = torch.tensor(vec.transform(test).toarray(), dtype=torch.float32)
    with torch.no_grad():
        expected = x @ model.embed.weight[order] + model.head.bias
        assert torch.allclose(model(*data.pad(test)), expected, atol=1e-5)
    assert model.idf[7] == 0 and torch.equal(model(*data.pad([[7]])), model.head.bias[None].detach())
    with pytest.raises(LabError, match="no hidden layer"):
        models.bag(vocab_size=8, num_classes=3, embed_dim=None, hidden=True)


def test_a_short_r8_svm_run_learns_and_predicts_scores(tmp_path: Path) -> None:
    """text_reuters_svm: one-vs-rest squared hinge on every word's TF-IDF, two epochs."""
    args = ["+experiment=text_reuters_svm", "logger=none", "trainer.progress=false", "trainer.max_epochs=2",
            "trainer.eval_every=100000"]
    run, _, losses, evals = short_run(tmp_path, args, "eval/accuracy")
    assert losses[-1] < 0.3 * losses[0], losses
    assert evals[-1]["eval/accuracy"] > 0.95, evals[-1]  # measured 0.972 (10 epochs: 0.975)
    info = next(r for r in read_metrics(run) if "data/vocab_size" in r)
    assert info["data/unknown_share_train"] == 0 and info["data/cut_share_train"] == 0  # every word, whole texts
    table = sorted((run / "media").glob("eval_misclassified_*.csv"))[-1].read_text().splitlines()
    assert table[0] == "text (first words),topic,prediction,score"
    inbox = tmp_path / "news.txt"
    inbox.write_text("shr profit net revenues dividend quarter\nwheat grain tonnes export corn harvest\n")
    pred = tmp_path / "pred"
    predicted, smoothed, unknown = run_lab_cases(tmp_path, [
        [*args, "mode=predict", f"checkpoint={run / 'checkpoints' / 'best.pt'}", f"input={inbox}",
         f"hydra.run.dir={pred}"],
        [*args, "label_smoothing=0.1", f"hydra.run.dir={tmp_path / 'smoothed'}"],
        [*args, "loss=hinge", f"hydra.run.dir={tmp_path / 'unknown'}"]])
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    rows = (pred / "predictions.tsv").read_text().splitlines()
    assert rows[0] == "line\ttopic\tscore" and [r.split("\t")[1] for r in rows[1:]] == ["earn", "grain"]
    assert smoothed.returncode != 0 and "label_smoothing=0.1 applies to loss=cross_entropy only" in smoothed.stderr
    assert unknown.returncode != 0 and "loss='hinge' is unknown; use one of cross_entropy" in unknown.stderr
    assert "Traceback" not in smoothed.stderr + unknown.stderr and not (tmp_path / "unknown" / "model.txt").exists()
