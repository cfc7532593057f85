"""Image captioning: a CNN encoder and an LSTM decoder (vision/captioners.py) write a sentence per image.

Config: `model` (conf/model/nic.yaml: the encoder from the lab's zoo, `attention`, sizes), `optimizer`,
`scheduler`, `data` (conf/data/caption_digits | coco_captions | flickr8k: the images and their reference
captions, `vocab_size`, `min_freq`, `max_len`, `batch_size`, `bucket_pool`), `decode` (`beam_size`: 1 is
greedy search, `length_norm`, `max_len`) and `captioning` (what the media show, the attention penalty).

Training pairs every image, once an epoch, with one of its reference captions drawn at random, and minimises
the words' cross-entropy under teacher forcing (with attention, plus Show, Attend and Tell's penalty
`captioning.attention_penalty` * sum over positions of (1 - the attention they got over the caption)^2).
The vocabulary is built from the training captions only and travels in every checkpoint (and `vocab.json`).

Evaluation decodes every test image (`decode`) and scores the captions against all the image's references
with COCO's scorers (pycocoevalcap): `eval/bleu1`..`eval/bleu4` (corpus BLEU; `bleu4` is the main metric)
and `eval/cider` (CIDEr, idf from the test references). On digit scenes it also parses what each caption
claims (vision/scene_captions.py): `eval/digits_right` (the right digits), `eval/relation_right` (in the
right order along the right axis) and `eval/exact` (and the right sizes). Each evaluation logs a table of
test images with the generated caption beside the references (CSV; W&B Table with the images) and a PNG of
them; with attention, one panel per word showing where the decoder looked (`media/eval/attention_*.png`).

    python -m lab +experiment=caption_digits model.attention=true decode.beam_size=3
    python -m lab +experiment=caption_digits mode=predict checkpoint=RUN/checkpoints/best.pt input=DIR
        # <run dir>/captions.tsv: one caption per image of DIR
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lab import io
from lab.config import build
from lab.errors import LabError
from lab.media import to_uint8_hwc
from lab.plots import plt
from lab.task import RunContext
from text.data import SPECIALS, Vocabulary, length_batches, tokenize
from vision import captioners, scene_captions
from vision.captioners import BOS, EOS, PAD
from vision.image_task import ImageTask, input_images

WORDS = (*SPECIALS, "<bos>", "<eos>")  # ids 0..3: captioners.PAD, UNK, BOS, EOS


class CaptionSet:
    """Images (N, C, S, S) uint8, their reference captions (strings and tokens) and names; for digit scenes
    also their layouts (what a true caption says) and the digits' class names."""

    def __init__(self, images: torch.Tensor, captions: list[list[str]], names: list[str], lowercase: bool,
                 layouts: list[scene_captions.Layout] | None = None, classes: tuple[str, ...] | None = None,
                 skipped: dict[str, int] | None = None):
        self.images, self.captions, self.names = images, captions, names
        self.tokens = [[tokenize(c, lowercase) for c in caps] for caps in captions]
        self.layouts, self.classes, self.skipped = layouts, classes, dict(skipped or {})


def load(d: Mapping[str, Any], split: str) -> CaptionSet:
    """The `split` of a captioning data config: digit scenes with grammar captions, or a reader's folder."""
    lowercase = bool(d.get("lowercase", True))
    if d.get("name") == "caption_digits":
        from vision import scenes

        made = scenes.from_config(d, split)
        cut = d.get("subset" if split == "train" else "test_subset")
        captions, layouts = scene_captions.captions_of(made, float(d.get("large", 0.33)))
        n = int(cut) if cut else len(captions)
        return CaptionSet(made.images[:n], captions[:n], [f"{split}_{i:05d}" for i in range(n)], lowercase,
                          layouts[:n], made.classes)
    from vision import caption_data

    got = caption_data.from_config(d, split)
    return CaptionSet(got.images, got.captions, got.names, lowercase, skipped=got.skipped)


def words_per_caption(encoded: list[list[list[int]]]) -> float:
    """The mean number of predicted words (the words and EOS) of the encoded training captions: the loss's
    divisor per image."""
    return sum(len(c) - 1 for caps in encoded for c in caps) / max(1, sum(len(caps) for caps in encoded))


def encode(vocab: Vocabulary, tokens: list[str], max_len: int | None) -> list[int]:
    """BOS, the word ids (cut after `max_len` words), EOS."""
    return [BOS, *vocab.encode(tokens, max_len), EOS]


def text_scores(references: list[list[list[str]]], captions: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr (COCO's scorers, pycocoevalcap) of `captions` (one word list per image)
    against every image's references (word lists)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs = {i: [" ".join(t) for t in caps] for i, caps in enumerate(references)}
    hyps = {i: [" ".join(w)] for i, w in enumerate(captions)}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    cider, _ = Cider().compute_score(refs, hyps)
    return {**{f"bleu{n}": float(b) for n, b in enumerate(bleu, 1)}, "cider": float(cider)}


class CaptionLoader:
    """Batches (images (B, C, S, S) float in [0, 1], captions (B, T) ids BOS .. EOS padded) on the device: every
    image once an epoch, in a permutation of `(seed, epoch)`, with one of its captions drawn at random; each
    DDP rank its own share. With `pool` > 1, each run of `pool` batches is sorted by caption length before it
    is cut into batches and the batches are shuffled (as the text family's `BucketLoader`): a batch pads only to
    its own longest caption, and the decoder runs that many steps, not the longest of a random batch."""

    def __init__(self, images: torch.Tensor, captions: list[list[list[int]]], batch_size: int,
                 device: torch.device, seed: int = 0, rank: int = 0, world_size: int = 1, pool: int = 0):
        self.images = images.to(device)
        flat = [c for caps in captions for c in caps]
        self.first = torch.tensor([0, *torch.tensor([len(c) for c in captions]).cumsum(0).tolist()[:-1]])
        self.count = torch.tensor([len(c) for c in captions])
        self.ids = torch.full((len(flat), max(len(c) for c in flat)), PAD, dtype=torch.long)
        for i, c in enumerate(flat):
            self.ids[i, : len(c)] = torch.tensor(c)
        self.lengths = torch.tensor([len(c) for c in flat])
        self.batch_size, self.device, self.seed, self.epoch = int(batch_size), device, seed, 0
        self.rank, self.world_size, self.pool = rank, world_size, int(pool)
        if self.pool < 0:
            raise LabError(f"data.bucket_pool={pool} must be 0 (random batches) or a number of batches sorted "
                           "by length together")
        if len(self) < 1:
            raise LabError(f"{len(images)} training images over {world_size} rank(s) make no batch of "
                           f"{batch_size}; lower data.batch_size or use more images")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, len(self.images), self.world_size)) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.images), generator=g)[self.rank:: self.world_size]
        pick = self.first[order] + (torch.rand(len(order), generator=g) * self.count[order]).long()
        n = len(self) * self.batch_size
        order, pick = order[:n], pick[:n]
        batches = (length_batches(self.lengths[pick], self.batch_size, self.pool, g) if self.pool > 1
                   else torch.arange(n).view(-1, self.batch_size))
        for rows in batches:
            b, c = order[rows], pick[rows]
            t = int(self.lengths[c].max())
            yield (self.images[b.to(self.images.device)].float().div_(255),
                   self.ids[c, :t].to(self.device, non_blocking=True))


class Captioning(ImageTask):
    main_metric = "eval/bleu4"
    progress_keys = ("loss", "word_accuracy")

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        d = cfg.data
        train, self.test = load(d, "train"), load(d, "test")
        self.max_len = int(d.max_len) if d.get("max_len") else None
        self.decode = dict(cfg.get("decode") or {})
        unknown = sorted(set(self.decode) - {"beam_size", "length_norm", "max_len"})
        if unknown:
            raise LabError(f"decode has unknown keys {unknown}; it takes beam_size, length_norm and max_len")
        self.show = cfg.get("captioning") or {}
        size = d.get("vocab_size")
        words = Vocabulary.build([t for caps in train.tokens for t in caps], None, int(d.get("min_freq", 1)))
        kept = words.words[len(SPECIALS):][: None if size is None else max(0, int(size) - len(WORDS))]
        self.vocab = Vocabulary([*WORDS, *kept])
        encoded = [[encode(self.vocab, t, self.max_len) for t in caps] for caps in train.tokens]
        channels = int(train.images.shape[1])
        self.model = build(cfg.model, "model", vocab_size=len(self.vocab), in_channels=channels,
                           image_size=int(train.images.shape[-1]), _recursive_=False)  # the encoder: built by NIC
        self.loader = CaptionLoader(train.images, encoded, int(d.batch_size), ctx.device, ctx.seed,
                                    ctx.dist.rank, ctx.dist.world_size, pool=int(d.get("bucket_pool") or 0))
        # the loss divides a batch's summed word losses by this constant, so every word weighs the same whatever
        # the length of the batch's captions (a mean per batch would weigh the words of short batches more)
        self.words_per_caption = words_per_caption(encoded)
        self.eval_batch_size = int(d.get("eval_batch_size", 100))
        self.image_size = int(train.images.shape[-1])
        unknown_share = sum(i == 1 for caps in encoded for c in caps for i in c) / max(
            1, sum(len(c) - 2 for caps in encoded for c in caps))
        self.describe({"data/train_images": len(train.images), "data/test_images": len(self.test.images),
                       "data/train_captions": sum(len(c) for c in train.captions), "data/vocab_size": len(self.vocab),
                       "data/unknown_share_train": unknown_share,
                       **{f"data/skipped_{s}": sum(x.skipped.values()) for s, x in (("train", train),
                                                                                  ("test", self.test))}})
        if ctx.dist.is_main and ctx.mode == "train":
            print(f"[lab] {len(train.images):,} training images ({self.info['data/train_captions']:,} captions), "
                  f"{len(self.test.images):,} test images; vocabulary {len(self.vocab):,} words, unknown "
                  f"{unknown_share:.1%} of training words", flush=True)
            for split, s in (("training", train), ("test", self.test)):
                if s.skipped:
                    print(f"[lab] skipped in the {split} split (data.skip_bad): "
                          + ", ".join(f"{n} {k}" for k, n in s.skipped.items()), flush=True)
            io.write_json(ctx.run_dir / "vocab.json", {"words": self.vocab.words})

    # The vocabulary travels in every checkpoint (state_dict's "_extra_state").
    def get_extra_state(self) -> dict[str, Any]:
        return {"words": self.vocab.words}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if len(state["words"]) != len(self.vocab):
            raise LabError(f"the checkpoint's vocabulary has {len(state['words'])} words, this run's "
                           f"{len(self.vocab)}; use the data settings (data.vocab_size, data.min_freq) it was "
                           "trained with")
        self.vocab = Vocabulary(state["words"])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], optim) -> dict:
        images, ids = batch
        targets = ids[:, 1:]
        logits, alphas = self.model(images, ids[:, :-1])
        logits = logits.float()
        mask = targets != PAD
        loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD, reduction="sum",
                               label_smoothing=float(self.cfg.get("label_smoothing", 0.0)))
        loss = loss / (len(images) * self.words_per_caption)
        out = {}
        penalty = float(self.show.get("attention_penalty", 0.0))
        if alphas is not None and penalty:
            spread = ((1 - (alphas.float() * mask.unsqueeze(-1)).sum(1)) ** 2).mean()
            out["attention_penalty"] = spread
            loss = loss + penalty * spread
        optim.step("model", loss)
        right = ((logits.argmax(-1) == targets) & mask).sum() / mask.sum()
        return {"loss": loss, "word_accuracy": right, **out}

    # ---- decoding and evaluation -----------------------------------------------------------------
    def caption(self, images: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
        """Captions (word ids) of (N, C, S, S) uint8 images by `decode`, and their log-probabilities."""
        beam = int(self.decode.get("beam_size", 1))
        max_len = int(self.decode.get("max_len") or self.max_len or 30)
        ids, scores = [], []
        for i in range(0, len(images), self.eval_batch_size):
            x = images[i: i + self.eval_batch_size].to(self.ctx.device).float().div_(255)
            if beam == 1:
                got, logp = captioners.greedy(self.model, x, max_len)
            else:
                got, logp = captioners.beam_search(self.model, x, beam, max_len,
                                                   float(self.decode.get("length_norm", 0.0)))
            ids += got
            scores.append(logp)
        return ids, torch.cat(scores)

    def evaluate(self) -> dict:
        self.log_info_once()
        ids, logp = self.caption(self.test.images)
        words = [self.vocab.decode(s) for s in ids]
        out = {**text_scores(self.test.tokens, words), "logprob": float(logp.mean()),
               "length": sum(map(len, words)) / max(1, len(words))}
        if self.test.layouts is not None:
            claimed = [scene_captions.parse(w, self.test.classes) for w in words]
            out.update(scene_captions.score(claimed, self.test.layouts))
        self._show(ids, words)
        return out

    def _show(self, ids: list[list[int]], words: list[list[str]]) -> None:
        n = min(int(self.show.get("media_images", 8)), len(words))
        if n == 0:
            return
        rows = [[self.test.names[i], " ".join(words[i]), " | ".join(self.test.captions[i])] for i in range(n)]
        self.ctx.logger.log_table("eval/captions", ["image", "generated", "references"], rows,
                                  images=[self.test.images[i] for i in range(n)])
        cols = min(4, n)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 3.9 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i in range(n):
            ax = axes.flat[i]
            ax.imshow(to_uint8_hwc(self.test.images[i]), cmap="gray", vmin=0, vmax=255)
            ax.set_title(_wrap(" ".join(words[i])) + "\n(truth: " + _wrap(self.test.captions[i][0]) + ")",
                         fontsize=7)
        fig.tight_layout()
        self.ctx.logger.log_image("eval/captions", fig)
        k = min(int(self.show.get("attention_images", 2)), n) if self.model.attention else 0
        if k:  # the attention of each generated word, by teacher forcing the captions just written
            images = self.test.images[:k].to(self.ctx.device).float().div_(255)
            _, alphas = captioners.sequence_logprob(self.model, images, ids[:k])
            for i in range(k):
                self.ctx.logger.log_image(f"eval/attention_{i}", self._attention_figure(i, words[i], alphas[i]))

    def _attention_figure(self, i: int, words: list[str], alpha: torch.Tensor) -> Any:
        """One panel per word (and the end): the test image with the attention of that step upsampled on it."""
        h, w = self.model.grid
        steps = [*words, "<end>"]
        fig, axes = plt.subplots(1, len(steps), figsize=(1.6 * len(steps), 1.9), squeeze=False)
        image = to_uint8_hwc(self.test.images[i])
        for ax, word, a in zip(axes.flat, steps, alpha):
            heat = F.interpolate(a.view(1, 1, h, w).float(), size=image.shape[:2], mode="bilinear",
                                 align_corners=False)[0, 0]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.imshow(heat.numpy(), cmap="jet", alpha=0.45)
            ax.set_title(word, fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        return fig

    # ---- mode=predict ----------------------------------------------------------------------------
    def predict(self, folder: Path) -> dict[str, Any]:
        """One caption per image of `folder`: <run dir>/captions.tsv (file, caption, log-probability)."""
        from vision.caption_data import fit_image
        from vision.detection import read_image

        files = input_images(folder)
        channels = int(self.loader.images.shape[1])
        images = torch.stack([fit_image(read_image(f, channels), self.image_size) for f in files])
        ids, logp = self.caption(images)
        words = [self.vocab.decode(s) for s in ids]
        out = self.ctx.run_dir / "captions.tsv"
        io.write_text(out, "file\tcaption\tlogprob\n" + "".join(
            f"{f.name}\t{' '.join(w)}\t{s:.4f}\n" for f, w, s in zip(files, words, logp.tolist())))
        print(f"[lab] {len(files)} images captioned: {out}", flush=True)
        return {"images": len(files), "captions": str(out)}


def _wrap(text: str, width: int = 40) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or "(empty)"
