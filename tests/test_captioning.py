"""Image captioning: the scene grammar against the layouts, BLEU and CIDEr, greedy and beam search, a short run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import DATA, run_lab_cases, short_run
from lab.errors import LabError
from text.data import tokenize
from vision import captioners, scene_captions, scenes
from vision.captioners import BOS, EOS, PAD
from vision.captioning import text_scores

SCENES = {"name": "caption_digits", "root": str(DATA), "download": False, "size": 64, "objects": [1, 3],
          "scale": [0.7, 1.3], "n_train": 10, "n_test": 300, "seed": 0, "channels": 1, "overlap": False}


def test_every_scene_caption_is_true_of_its_scene() -> None:
    made = scenes.from_config(SCENES, "test")
    captions, layouts = scene_captions.captions_of(made, 0.33)
    assert Counter(len(t.classes) for t in layouts).keys() == {1, 2, 3}
    for caps, layout, boxes, labels in zip(captions, layouts, made.boxes, made.labels):
        assert len(caps) == 5 and len(set(caps)) == 5
        # the layout, worked out here from the boxes: reading order along the axis of the larger spread
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        spread = centres.max(0).values - centres.min(0).values
        axis = None if len(boxes) == 1 else ("x" if spread[0] >= spread[1] else "y")
        order = sorted(range(len(boxes)), key=lambda i: float(centres[i, 0 if axis in ("x", None) else 1]))
        assert layout.classes == tuple(int(labels[i]) for i in order) and layout.axis == axis
        assert layout.sizes == tuple("large" if boxes[i, 3] - boxes[i, 1] >= 0.33 * 64 else "small" for i in order)
        count = ("one", "two", "three")[len(boxes) - 1]
        for c in caps:  # each phrasing says what the layout is, and parses back to it
            assert scene_captions.parse(tokenize(c), made.classes) == layout, c
            words = tokenize(c)
            assert sorted(w for w in words if w.isdigit()) == sorted(str(int(k)) for k in labels), c
            assert not {"one", "two", "three", "four"} - {count} & set(words), c  # never a wrong count
        assert sum(count in tokenize(c) for c in caps) >= 2  # two phrasings or more say how many
    pair = scene_captions.Layout((1, 7), ("small", "large"), "x")
    assert scene_captions.describe(pair, [str(i) for i in range(10)])[:3] == [
        "two digits: a small 1 on the left and a large 7 on the right", "a small 1 to the left of a large 7",
        "a large 7 to the right of a small 1"]


def test_parse_and_score_of_wrong_captions() -> None:
    classes = [str(i) for i in range(10)]
    truth = [scene_captions.Layout((1, 7), ("small", "large"), "x")] * 4
    said = ["a small 7 to the left of a large 1",   # right digits, wrong order
            "a large 7 to the right of a small 1",  # right in every way, said the other way round
            "a small 1 on the left and a small 7 on the right",  # right relation, wrong size
            "two digits"]                            # no digit named
    claimed = [scene_captions.parse(tokenize(s), classes) for s in said]
    assert claimed[3] is None
    assert scene_captions.score(claimed, truth) == {"digits_right": 0.75, "relation_right": 0.5, "exact": 0.25}
    fashion = ("T-shirt/top", "Trouser", "Bag")  # a class name that holds an axis word ("top")
    got = scene_captions.parse(tokenize("a large t-shirt/top to the left of a small bag"), fashion)
    assert got == scene_captions.Layout((0, 2), ("large", "small"), "x")


def test_bleu_and_cider_of_identical_and_unrelated_captions() -> None:
    refs = [[["a", "small", "1", "to", "the", "left", "of", "a", "large", "7"]],
            [["one", "digit", "a", "large", "3"]], [["a", "small", "9", "above", "a", "small", "0"]]]
    same = text_scores(refs, [r[0] for r in refs])
    assert all(same[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6) for n in range(1, 5))
    assert same["cider"] == pytest.approx(10.0, abs=1e-6)  # CIDEr's scale: 10 x the mean cosine similarity
    other = text_scores(refs, [["dog", "runs"], ["red", "car", "parked"], ["blue", "sky"]])
    assert other["bleu1"] == pytest.approx(0.0, abs=1e-6) and other["cider"] == pytest.approx(0.0, abs=1e-6)


class Chain(torch.nn.Module):
    """A decoder whose next-word distribution depends on the last word only (a fixed table), for search tests."""

    attention = False

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.logp = table.log_softmax(-1)

    def start(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"n": torch.zeros(len(images), 1)}

    def step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict, None]:
        return self.logp[tokens], state, None


def test_beam_search_beats_greedy_where_greedy_is_short_sighted() -> None:
    # from BOS: word 4 (p 0.55) then a flat choice of 4 words; word 5 (p 0.45) then EOS for sure
    table = torch.full((8, 8), -1e9)
    table[BOS, 4], table[BOS, 5] = torch.tensor(0.55).log(), torch.tensor(0.45).log()
    table[4, 4:8] = 0.0
    table[5, EOS] = 0.0
    table[6:8, EOS] = 0.0
    table[EOS, EOS] = 0.0
    chain, x = Chain(table), torch.zeros(1, 1, 4, 4)
    g_ids, g_score = captioners.greedy(chain, x, max_len=2)
    b_ids, b_score = captioners.beam_search(chain, x, beam_size=2, max_len=2)
    assert b_ids == [[5]] and float(b_score) == pytest.approx(float(torch.tensor(0.45).log()), abs=1e-5)
    assert g_ids[0][0] == 4 and float(g_score) < float(b_score)


def _tiny_nic(attention: bool) -> captioners.NIC:
    torch.manual_seed(0)
    enc = {"_target_": "vision.resnet.resnet20", "width": 8}
    return captioners.NIC(12, 1, enc, image_size=16, level=4, embed=16, hidden=24, attention=attention,
                          attention_dim=8).eval()


@pytest.mark.parametrize("attention", [False, True])
def test_beam_one_is_greedy_and_a_wider_beam_never_scores_lower(attention: bool) -> None:
    model = _tiny_nic(attention)
    with torch.no_grad():  # sharpen the random model so that beams differ
        model.out.weight.mul_(8)
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    g_ids, g_score = captioners.greedy(model, images, max_len=8)
    b1_ids, b1_score = captioners.beam_search(model, images, beam_size=1, max_len=8)
    assert b1_ids == g_ids and torch.allclose(b1_score, g_score, atol=1e-5)
    b3_ids, b3_score = captioners.beam_search(model, images, beam_size=3, max_len=8)
    assert (b3_score >= g_score - 1e-5).all() and (b3_score > g_score + 1e-3).any(), (b3_score, g_score)
    # each reported score is the model's own log-probability of the caption and its EOS, by teacher forcing
    assert all(len(c) <= 8 for c in b3_ids)
    forced, alphas = captioners.sequence_logprob(model, images, b3_ids)
    assert torch.allclose(forced, b3_score, atol=1e-4)
    assert all(PAD not in c and BOS not in c and EOS not in c for c in b3_ids)
    if attention:  # one distribution over the 4x4 map per word
        assert alphas.shape[-1] == 16 and torch.allclose(alphas.sum(-1), torch.ones(alphas.shape[:2]), atol=1e-5)


TINY = ["+experiment=caption_digits", "logger=none", "trainer.progress=false", "data.size=48", "data.scale=[0.6,1.0]",
        "data.n_train=1600", "data.n_test=100", "trainer.max_epochs=3", "trainer.eval_every=50", "trainer.log_every=5",
        "data.batch_size=32", "model.encoder={_target_: vision.deep_cnn.DeepCNN}", "model.level=8", "model.embed=64",
        "model.hidden=128", "optimizer.lr=5e-3", "model.attention=true"]


def test_a_short_caption_digits_run_learns_then_evaluates_and_predicts(tmp_path: Path) -> None:
    run, env, losses, evals = short_run(tmp_path, TINY, "eval/bleu4")
    assert losses[-1] < 0.35 * losses[0], losses
    last = evals[-1]
    # one caption for every scene scores up to BLEU-4 0.24 and CIDEr 0.73 on these test scenes (the best of four
    # such captions tried); 150 steps learn more than the grammar (measured 0.39 and 1.19)
    assert last["eval/bleu4"] > 0.3 and last["eval/cider"] > 0.9, last
    media = {f.name.rsplit("_", 1)[0] for f in (run / "media").iterdir()}
    assert {"eval_captions", "eval_attention_0"} <= media, media
    table = next((run / "media").glob("eval_captions_*.csv")).read_text().splitlines()
    assert table[0] == "image,generated,references" and len(table) == 9
    assert json.loads((run / "vocab.json").read_text())["words"][:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    made = scenes.from_config({**SCENES, "n_test": 3}, "test")
    for i, image in enumerate(made.images):
        Image.fromarray(image[0].numpy()).save(inbox / f"scene{i}.png")
    checkpoint = run / "checkpoints" / "best.pt"
    pred, ev = tmp_path / "pred", tmp_path / "eval"
    predicted, evaluated = run_lab_cases(tmp_path, [
        [*TINY, "mode=predict", f"checkpoint={checkpoint}", f"input={inbox}", "decode.beam_size=3",
         f"hydra.run.dir={pred}"],
        [*TINY, "mode=eval", f"checkpoint={checkpoint}", f"hydra.run.dir={ev}"]])
    assert predicted.returncode == 0 and evaluated.returncode == 0, predicted.stderr[-2000:] + evaluated.stderr[-2000:]
    rows = (pred / "captions.tsv").read_text().splitlines()
    assert rows[0] == "file\tcaption\tlogprob" and [r.split("\t")[0] for r in rows[1:]] == [
        f"scene{i}.png" for i in range(3)]
    assert all(r.split("\t")[1] for r in rows[1:])
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["eval/bleu4"] == pytest.approx(max(r["eval/bleu4"] for r in evals), abs=1e-6)  # best.pt's own


def test_the_encoder_loads_a_lab_classifiers_weights_and_can_stay_frozen(tmp_path: Path) -> None:
    from vision.resnet import resnet20

    torch.manual_seed(3)
    classifier = resnet20(in_channels=1, image_size=16, width=8)
    torch.save(classifier.state_dict(), tmp_path / "weights.pt")
    enc = {"_target_": "vision.resnet.resnet20", "width": 8}
    model = captioners.NIC(12, 1, enc, image_size=16, level=4, embed=16, hidden=24,
                           weights=str(tmp_path / "weights.pt"), freeze=True)
    conv = model.body.layers[0]
    assert torch.equal(conv.weight, classifier.conv1.weight)
    assert not any(p.requires_grad for p in model.body.parameters())
    assert all(p.requires_grad for p in model.lstm.parameters())
    # model.encoder=NAME takes a zoo model's own config (conf/model/NAME.yaml); anything else is one line
    assert captioners.NIC(12, 1, "resnet20", image_size=16, level=4).grid == (4, 4)
    with pytest.raises(LabError, match="model.encoder=lstm is not a lab classifier"):
        captioners.NIC(12, 1, "lstm", image_size=16, level=4)


def test_caption_batches_cover_every_image_once_and_bucketing_sorts_by_length() -> None:
    """Random batches (pool 0) and length-sorted ones (pool N) both take every image once an epoch with one of
    its own captions; sorted ones pad less; the loss's divisor is the mean caption's predicted words."""
    from vision.captioning import CaptionLoader, words_per_caption

    g = torch.Generator().manual_seed(0)
    n, lengths = 96, torch.randint(1, 12, (96,), generator=g).tolist()
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    # image i's captions: BOS, i+4 repeated (its length, and the second one word longer), EOS
    captions = [[[BOS, *[i + 4] * k, EOS], [BOS, *[i + 4] * (k + 1), EOS]] for i, k in enumerate(lengths)]
    assert words_per_caption(captions) == pytest.approx(sum(2 * k + 3 for k in lengths) / (2 * n))
    padded = {}
    for pool in (0, 4):
        loader = CaptionLoader(images, captions, 8, torch.device("cpu"), seed=1, pool=pool)
        seen, pads = [], 0
        for x, ids in loader:
            seen += x[:, 0, 0, 0].mul(255).round().long().tolist()
            for img, row in zip(x[:, 0, 0, 0].mul(255).round().long().tolist(), ids.tolist()):
                assert {w for w in row if w not in (BOS, EOS, PAD)} == {img + 4}  # one of its own captions
            pads += int((ids == PAD).sum())
        assert sorted(seen) == list(range(n)) and len(loader) == n // 8
        padded[pool] = pads
    assert padded[4] < padded[0] / 2
    with pytest.raises(LabError, match=r"data.bucket_pool=-1 must be 0"):
        CaptionLoader(images, captions, 8, torch.device("cpu"), pool=-1)
