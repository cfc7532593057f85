"""Image captioning of digit scenes: NIC with and without attention in the lab's `caption_digits`, each decoded
by greedy search and by beam search, then the better of them against a plain PyTorch loop with a DataLoader.

    python benchmarks/caption_digits.py                            # both models, beams 1 and 3, the plain loop
    python benchmarks/caption_digits.py --models nic --no-plain    # one model, no plain loop

1. The lab: `python -m lab +experiment=caption_digits model.attention=A logger=none trainer.progress=false`
   (scenes and their grammar captions made in memory, the trainer's loop, greedy decoding of the test scenes
   every `trainer.eval_every` steps). Records every evaluation (BLEU-1..4, CIDEr, the shares of captions with
   the right digits and the right relation), the seconds of training until BLEU-4 and the digits' share first
   reach the targets (evaluations included, scene making excluded), the training images/s; then the last
   checkpoint evaluated again with `decode.beam_size=3` (`mode=eval`).
2. The plain loop, for the model with the better final digits' share: the same train scenes written to disk
   as PNG files with a COCO captions JSON, a Dataset that decodes an image per item and draws one of its
   captions, a shuffled DataLoader (same batch size, `--workers`) whose collate pads every batch to its
   longest caption, the same model built from the same composed config, AdamW and the one-cycle schedule over
   the same steps, the same loss and clipping, in fp32 and NCHW as tutorials train (the lab: the experiment's
   `trainer.precision=auto`, bf16 where the CPU has it natively, and `trainer.channels_last`); then the same
   greedy decoding and scoring of the same test scenes. On an AVX512-BF16 CPU both train 16 epochs instead
   of the yaml's 6 (`KIND_ARGS`).
3. The ratio: the lab's training images/s over the loop's, each the median over 25-step windows (the first
   left out). This machine's speed drifts by 10-20% within minutes, and the two full runs are minutes apart,
   so `--speed-pairs` (3) short runs of each side follow in turn (`--speed-steps` 150, no evaluation); the
   recorded ratio is the median of the full runs' ratio and the pairs' ratios, all of which are recorded.

The encoder starts from the lab's `mnist_cnn` trained for `--pretrain-epochs` (3) on the MNIST train digits,
as NIC starts from a trained CNN; those wall seconds count towards the 10 minutes. Both models and the plain
loop load the same checkpoint.

Writes benchmarks/results/<name>.json (default caption_digits; caption_digits_avx2 on a CPU without native
bf16).
"""

from __future__ import annotations

import argparse
import json
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

BLEU4, DIGITS = 0.6, 0.95  # targets: BLEU-4 and the share of test captions naming exactly the right digits
BUDGET_S = 600  # within 10 minutes of training
MODELS = {"nic": ["model.attention=false"], "attention": ["model.attention=true"]}
# Epochs per kind of 2-core CPU, as measured: AVX2 trains the yaml's 6 epochs of the attention model in about
# 8 minutes (fp32); AVX512-BF16 in about 2.5 (bf16), so it trains 16 in the same 10 minutes.
KIND_ARGS = {"_avx2": [], "": ["trainer.max_epochs=16"]}[record.cpu_kind_suffix()]
KEEP = ("eval/bleu", "eval/cider", "eval/digits_right", "eval/relation_right", "eval/exact", "eval/logprob")


def pretrain(epochs: int, work: Path, extra: list[str]) -> dict[str, Any]:
    """The encoder's start, as NIC starts from a trained CNN: the lab's `mnist_cnn` (the book's CNN on the MNIST
    train digits, the scenes' own source) for `epochs`; its wall seconds count towards the budget."""
    args = ["+experiment=mnist_cnn", "logger=none", "trainer.progress=false", f"trainer.max_epochs={epochs}", *extra]
    rows, wall = record.run_lab(args, work / "encoder")
    return {"command": " ".join(["python -m lab", *args]), "wall_s": round(wall, 1),
            "test_accuracy": round(next(r["eval/accuracy"] for r in reversed(rows) if "eval/accuracy" in r), 4),
            "checkpoint": str(work / "encoder" / "checkpoints" / "best.pt")}


def lab_side(args: list[str], work: Path, before_s: float) -> dict[str, Any]:
    run = work / "run"
    rows, wall = record.run_lab(args, run)
    evals = record.evaluations(rows, "eval/bleu4", KEEP)
    for e in evals:  # seconds from the start of the encoder's pretraining
        e["elapsed_s_with_pretraining"] = round(e["elapsed_s"] + before_s, 1)
    hit = next((e for e in evals if e["bleu4"] >= BLEU4 and e["digits_right"] >= DIGITS), None)
    beam_rows, _ = record.run_lab([*args, "mode=eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}",
                                   "decode.beam_size=3"], work / "beam3")
    beam = next(r for r in reversed(beam_rows) if "eval/bleu4" in r)
    return {"command": " ".join(["python -m lab", *args]), "wall_s": round(wall, 1),
            "parameters": next(r["model/params"] for r in rows if "model/params" in r),
            "evaluations": evals, "final_greedy": evals[-1],
            "final_beam3": {k.split("/", 1)[1]: round(beam[k], 4) for k in beam if k.startswith(KEEP)},
            "seconds_to_targets": hit["elapsed_s_with_pretraining"] if hit else None,
            "step_to_targets": hit["step"] if hit else None,
            "meets_targets": bool(hit and hit["elapsed_s_with_pretraining"] <= BUDGET_S),
            "train_images_per_s_median": record.median_samples_per_s(rows)}


class CaptionFolder(torch.utils.data.Dataset):
    """Scenes on disk as a tutorial's captioning Dataset reads them: a PNG decoded per item, one of the image's
    captions (from a COCO captions JSON) drawn at random and turned into word ids."""

    def __init__(self, folder: Path, encode: Any):
        spec = json.loads((folder / "captions.json").read_text())
        names = {im["id"]: im["file_name"] for im in spec["images"]}
        self.items: dict[int, list[str]] = {}
        for a in spec["annotations"]:
            self.items.setdefault(a["image_id"], []).append(a["caption"])
        self.ids, self.names, self.folder, self.encode = sorted(self.items), names, folder, encode

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import random

        import numpy as np
        from PIL import Image

        key = self.ids[i]
        with Image.open(self.folder / self.names[key]) as im:
            image = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255)[None]
        return image, torch.tensor(self.encode(random.choice(self.items[key])))


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, captions = zip(*batch)
    return torch.stack(images), torch.nn.utils.rnn.pad_sequence(list(captions), batch_first=True, padding_value=0)


def plain_setup(cfg: Any, work: Path) -> dict[str, Any]:
    """The plain loop's data: the train scenes written as PNG files with a COCO captions JSON, read back by
    `CaptionFolder`; the vocabulary, the words per caption (the loss's constant) and the test scenes."""
    from PIL import Image

    from text.data import SPECIALS, Vocabulary, tokenize
    from vision.captioning import WORDS, encode, load, words_per_caption

    d = cfg.data
    train, test = load(d, "train"), load(d, "test")
    folder = work / "scenes_train"
    folder.mkdir()
    for name, image in zip(train.names, train.images):
        Image.fromarray(image[0].numpy()).save(folder / f"{name}.png")
    (folder / "captions.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{n}.png"} for i, n in enumerate(train.names)],
        "annotations": [{"id": 10 * i + k, "image_id": i, "caption": c} for i, caps in enumerate(train.captions)
                        for k, c in enumerate(caps)]}))
    words = Vocabulary.build([t for caps in train.tokens for t in caps]).words[len(SPECIALS):]
    vocab = Vocabulary([*WORDS, *words])
    max_len = int(d.max_len)
    return {"dataset": CaptionFolder(folder, lambda c: encode(vocab, tokenize(c), max_len)), "vocab": vocab,
            "per_caption": words_per_caption([[encode(vocab, t, max_len) for t in caps] for caps in train.tokens]),
            "test": test}


def plain_train(cfg: Any, data: dict[str, Any], steps: int, workers: int, every: int = 25
                ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The plain loop's training for `steps`: the model, and its images/s over the whole loop and the median
    over windows of `every` steps (the first left out, as the lab's logged rates)."""
    import statistics

    from lab.config import build
    from lab.optim import build_optimizer, build_scheduler

    d = cfg.data
    loader = torch.utils.data.DataLoader(data["dataset"], batch_size=int(d.batch_size), shuffle=True,
                                         num_workers=workers, drop_last=True, collate_fn=collate,
                                         persistent_workers=workers > 0)
    torch.manual_seed(int(cfg.seed))
    model = build(cfg.model, "model", vocab_size=len(data["vocab"]), in_channels=1, image_size=int(d.size),
                  _recursive_=False)
    opt = build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    sched = build_scheduler(cfg.scheduler, opt, steps)
    penalty = float(cfg.captioning.attention_penalty) if cfg.model.attention else 0.0
    model.train()
    step, seen, rates = 0, 0, []
    t0 = tw = time.perf_counter()
    while step < steps:
        for images, ids in loader:
            targets = ids[:, 1:]
            logits, alphas = model(images, ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=0,
                                                     reduction="sum") / (len(images) * data["per_caption"])
            if penalty:
                loss = loss + penalty * ((1 - (alphas * (targets != 0).unsqueeze(-1)).sum(1)) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.trainer.grad_clip))
            opt.step()
            sched.step()
            step, seen = step + 1, seen + len(images)
            if step % every == 0:
                now = time.perf_counter()
                rates.append(every * len(images) / (now - tw))
                tw = now
            if step >= steps:
                break
    train_s = time.perf_counter() - t0
    return model, {"steps": steps, "workers": workers, "train_s": round(train_s, 1),
                   "train_images_per_s": round(seen / train_s, 2),
                   "train_images_per_s_median": round(statistics.median(rates[1:] or rates), 2)}


def plain_side(cfg: Any, steps: int, workers: int, data: dict[str, Any]) -> dict[str, Any]:
    from vision import captioners, scene_captions
    from vision.captioning import text_scores

    model, out = plain_train(cfg, data, steps, workers)
    model.eval()
    test, vocab, d = data["test"], data["vocab"], cfg.data
    captions = []
    for i in range(0, len(test.images), int(d.eval_batch_size)):
        x = test.images[i: i + int(d.eval_batch_size)].float() / 255
        captions += [vocab.decode(c) for c in captioners.greedy(model, x, int(cfg.decode.max_len))[0]]
    claimed = [scene_captions.parse(c, test.classes) for c in captions]
    scores = {**text_scores(test.tokens, captions), **scene_captions.score(claimed, test.layouts)}
    return {**out, "final_greedy": {k: round(v, 4) for k, v in scores.items()}}


def speed_pairs(n: int, steps: int, args: list[str], cfg: Any, data: dict[str, Any], workers: int,
                work: Path) -> list[dict[str, Any]]:
    """`n` short runs of each side in turn (the lab, then the plain loop, `steps` each, no evaluation): this
    machine's speed drifts by 10-20% over minutes, so each pair's ratio compares the two at nearly one time."""
    pairs = []
    for i in range(n):
        rows, _ = record.run_lab([*args, f"trainer.max_steps={steps}", "trainer.max_epochs=null",
                                  f"trainer.eval_every={10 * steps}"],
                                 work / f"speed{i}")
        lab = record.median_samples_per_s(rows)
        plain = plain_train(cfg, data, steps, workers)[1]["train_images_per_s_median"]
        pairs.append({"lab_images_per_s": lab, "plain_images_per_s": plain, "ratio": round(lab / plain, 3)})
        print(json.dumps({"speed_pair": pairs[-1]}), flush=True)
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    ap.add_argument("--lab-args", nargs="*", default=[], help="extra overrides for every run")
    ap.add_argument("--workers", type=int, default=1, help="the plain loop's DataLoader workers")
    ap.add_argument("--speed-pairs", type=int, default=3,
                    help="short runs of the lab and the plain loop in turn, after the full runs, for the ratio")
    ap.add_argument("--speed-steps", type=int, default=150, help="training steps of each short run")
    ap.add_argument("--pretrain-epochs", type=int, default=3,
                    help="epochs of mnist_cnn for the encoder's start (0: the encoder from scratch)")
    ap.add_argument("--pretrain-args", nargs="*", default=[], help="extra overrides for the encoder's pretraining")
    ap.add_argument("--name", default="caption_digits" + record.cpu_kind_suffix())
    args = ap.parse_args()
    if args.speed_pairs and args.speed_steps < 75:
        ap.error("--speed-steps must be at least 75: both sides' rates are medians over 25-step windows, the first "
                 "left out as warm-up")
    base = ["+experiment=caption_digits", "logger=none", "trainer.progress=false", *KIND_ARGS, *args.lab_args]
    figures: dict[str, Any] = {"target_bleu4": BLEU4, "target_digits_right": DIGITS, "budget_s": BUDGET_S,
                               "kind_args": KIND_ARGS, "lab_args": args.lab_args, "models": {}}
    with tempfile.TemporaryDirectory(prefix="lab-cap-") as tmp:
        work = Path(tmp)
        before_s = 0.0
        if args.pretrain_epochs:
            figures["pretraining"] = pretrain(args.pretrain_epochs, work, args.pretrain_args)
            base.append(f"model.weights={figures['pretraining']['checkpoint']}")
            before_s = figures["pretraining"]["wall_s"]
        for m in args.models:
            figures["models"][m] = lab_side([*base, *MODELS[m]], work / m, before_s)
            print(json.dumps({m: figures["models"][m]["final_greedy"]}), flush=True)
            record.write(args.name, {**figures, "complete": False})
        best = max(figures["models"], key=lambda m: figures["models"][m]["final_greedy"]["digits_right"])
        figures["best_model"] = best
        figures["targets_met_by_best"] = figures["models"][best]["meets_targets"]
        if not args.no_plain:
            import statistics

            cfg = record.composed([*base, *MODELS[best]])
            steps = record.planned_steps(cfg)
            data = plain_setup(cfg, work)
            figures["plain_loop"] = {"model": best, **plain_side(cfg, steps, args.workers, data)}
            lab = figures["models"][best]
            full = round(lab["train_images_per_s_median"] / figures["plain_loop"]["train_images_per_s_median"], 3)
            figures["speed_pairs"] = speed_pairs(args.speed_pairs, args.speed_steps, [*base, *MODELS[best]], cfg,
                                                 data, args.workers, work)
            ratios = [full, *(p["ratio"] for p in figures["speed_pairs"])]
            figures["images_per_s_ratio_full_runs"] = full
            figures["images_per_s_ratios"] = ratios
            figures["images_per_s_ratio_lab_over_plain"] = round(statistics.median(ratios), 3)
            figures["bleu4_lab_minus_plain"] = round(
                lab["final_greedy"]["bleu4"] - figures["plain_loop"]["final_greedy"]["bleu4"], 4)
    record.write(args.name, {**figures, "complete": True})


if __name__ == "__main__":
    main()
