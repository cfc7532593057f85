"""Image captioners: a CNN from the lab's zoo encodes the image, an LSTM writes the caption a word at a time.

- `NIC` (Vinyals et al., Show and Tell): the encoder's map, flattened (or averaged) and projected, is the
  LSTM's first input; then the words, teacher-forced in training.
- `NIC(attention=True)` (Xu et al., Show, Attend and Tell): the LSTM starts from the averaged map; at every
  word a soft attention over the map's positions (their features plus a learned embedding of where they are,
  `positions`) gives a context vector (gated by the state) that joins the word's embedding as input; the
  paper's deep output (`deep_output`) predicts the word from the state, the context and the last word. The
  attention weights of every word come back for plotting.

Both decode through one interface, `start(images) -> state` and `step(tokens, state) -> (log-probs, state,
attention)`, on which `greedy` and `beam_search` run (batched over images, and over beams). Word ids: `PAD`,
`UNK`, then `BOS` and `EOS` (vision/captioning.py builds the vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lab.errors import LabError
from vision.detectors import make_body

PAD, UNK, BOS, EOS = 0, 1, 2, 3
State = dict[str, torch.Tensor]  # every tensor batch-first, so beams reorder with one index


def encoder_spec(encoder: Any) -> Any:
    """`model.encoder`: a classifier config (`{_target_: vision.resnet.resnet20, width: 16}`), or the name of a
    lab zoo model (`resnet20`, `resnet18`, `vgg11`, `deep_cnn`: its conf/model/NAME.yaml without its own
    transfer keys, since `model.weights` and `model.freeze` load and freeze the encoder)."""
    if not isinstance(encoder, str):
        return encoder
    from omegaconf import OmegaConf

    from lab.cli import CONF_DIR

    path = CONF_DIR / "model" / f"{encoder}.yaml"
    spec = OmegaConf.load(path) if path.is_file() else None
    if spec is None or not str(spec.get("_target_", "")).startswith(("vision.resnet.", "vision.vgg.",
                                                                      "vision.deep_cnn.")):
        raise LabError(f"model.encoder={encoder} is not a lab classifier; use resnet18, resnet20, resnet34, "
                       "resnet50, resnet56, vgg11..vgg19(_bn), deep_cnn, or a {_target_: ...} config")
    return OmegaConf.create({k: v for k, v in spec.items() if k not in ("weights", "freeze", "arch")})


class NIC(nn.Module):
    """Encoder (`encoder`: a lab classifier's config or name, cut at stride `level`) + LSTM decoder (module
    docstring)."""

    def __init__(self, vocab_size: int, in_channels: int, encoder: Any, image_size: int = 64, level: int = 16,
                 embed: int = 256, hidden: int = 512, dropout: float = 0.3, attention: bool = False,
                 attention_dim: int = 256, positions: bool = True, deep_output: bool = True,
                 pool: str = "flatten", weights: str | None = None,
                 freeze: bool | int = False, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None):
        super().__init__()
        if pool not in ("flatten", "mean"):
            raise LabError(f"model.pool={pool!r} is unknown; use flatten (keeps where things are) or mean")
        self.body, (channels,) = make_body(encoder_spec(encoder), in_channels, image_size, [int(level)], weights,
                                           freeze, single=True)
        with torch.no_grad():
            was = self.body.training
            h, w = self.body.eval()(torch.zeros(1, in_channels, image_size, image_size)).shape[-2:]
            self.body.train(was)
        self.grid = (int(h), int(w))
        self.attention, self.pool, self.hidden = bool(attention), pool, int(hidden)
        mean = torch.tensor(list(image_mean or [0.5] * in_channels)).view(1, -1, 1, 1)
        std = torch.tensor(list(image_std or [0.5] * in_channels)).view(1, -1, 1, 1)
        if mean.numel() != in_channels or std.numel() != in_channels:
            raise LabError(f"model.image_mean and model.image_std need {in_channels} values (one per channel)")
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=PAD)
        self.drop = nn.Dropout(dropout)
        self.deep_output = bool(attention and deep_output)
        self.out = nn.Linear(embed if self.deep_output else hidden, vocab_size)
        if self.attention:
            # where each map position is, learned and added to its features (the map alone barely says it)
            self.positions = nn.Parameter(torch.randn(1, h * w, channels) * 0.02) if positions else None
            if self.deep_output:  # the paper's deep output: the word from the state, the context and the last word
                self.deep_h = nn.Linear(hidden, embed)
                self.deep_z = nn.Linear(channels, embed)
            self.init_h = nn.Linear(channels, hidden)
            self.init_c = nn.Linear(channels, hidden)
            self.att_feat = nn.Linear(channels, attention_dim)
            self.att_state = nn.Linear(hidden, attention_dim)
            self.att_score = nn.Linear(attention_dim, 1)
            self.gate = nn.Linear(hidden, channels)
            self.cell = nn.LSTMCell(embed + channels, hidden)
        else:
            flat = channels * (h * w if pool == "flatten" else 1)
            # the image's embedding, layer-normalised: a raw conv map's scale would saturate the LSTM's gates
            self.project = nn.Sequential(nn.Linear(flat, embed), nn.LayerNorm(embed))
            self.lstm = nn.LSTM(embed, hidden, batch_first=True)

    # ---- encoder -------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats in [0, 1] -> the encoder's map (B, channels, h, w)."""
        return self.body((images - self.mean) / self.std)

    # ---- decoding, one word at a time ------------------------------------------------------------
    def start(self, images: torch.Tensor) -> State:
        fmap = self.encode(images)
        if self.attention:
            feats = fmap.flatten(2).transpose(1, 2)  # (B, L, C)
            if self.positions is not None:
                feats = feats + self.positions
            mean = feats.mean(1)
            return {"h": torch.tanh(self.init_h(mean)), "c": torch.tanh(self.init_c(mean)), "feats": feats,
                    "keys": self.att_feat(feats)}
        v = fmap.flatten(1) if self.pool == "flatten" else fmap.mean((2, 3))
        _, (h, c) = self.lstm(self.project(v).unsqueeze(1))
        return {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """tokens (B,) -> log-probabilities (B, V) of the next word, the new state, attention (B, L) or None."""
        logits, state, alpha = self._step(self.embed(tokens), state)
        return _word_logprobs(logits), state, alpha

    def _step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        if self.attention:
            state, context, alpha = self._attend(x, state)
            return self._emit(x, state["h"], context), state, alpha
        o, (h, c) = self.lstm(x.unsqueeze(1), (state["h"].transpose(0, 1).contiguous(),
                                               state["c"].transpose(0, 1).contiguous()))
        return self.out(self.drop(o[:, 0])), {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}, None

    def _attend(self, x: torch.Tensor, state: State) -> tuple[State, torch.Tensor, torch.Tensor]:
        """One word's recurrence with attention: the new state, the (gated) context and the weights (B, L)."""
        alpha = self.att_score(torch.tanh(state["keys"] + self.att_state(state["h"]).unsqueeze(1)))
        alpha = alpha.squeeze(-1).softmax(-1)  # (B, L)
        context = torch.sigmoid(self.gate(state["h"])) * (alpha.unsqueeze(-1) * state["feats"]).sum(1)
        h, c = self.cell(torch.cat([x, context], -1), (state["h"], state["c"]))
        return {**state, "h": h, "c": c}, context, alpha

    def _emit(self, x: torch.Tensor, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Word logits from the state (and, with the deep output, the context and the last word), any leading
        shape."""
        o = x + self.deep_h(h) + self.deep_z(context) if self.deep_output else h
        return self.out(self.drop(o))

    # ---- training: teacher forcing ---------------------------------------------------------------
    def forward(self, images: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: `inputs` (B, T) = BOS w1 .. wn (padded) -> logits (B, T, V) for w1 .. wn EOS, and
        the attention weights (B, T, L) (None without attention)."""
        if not self.attention:
            state = self.start(images)
            o, _ = self.lstm(self.embed(inputs), (state["h"].transpose(0, 1).contiguous(),
                                                  state["c"].transpose(0, 1).contiguous()))
            return self.out(self.drop(o)), None
        state, words = self.start(images), self.embed(inputs)
        hs, contexts, alphas = [], [], []
        for t in range(inputs.shape[1]):  # the recurrence word by word, the output layers once for all words
            state, context, alpha = self._attend(words[:, t], state)
            hs.append(state["h"])
            contexts.append(context)
            alphas.append(alpha)
        return self._emit(words, torch.stack(hs, 1), torch.stack(contexts, 1)), torch.stack(alphas, 1)


def reorder(state: State, index: torch.Tensor) -> State:
    return {k: v.index_select(0, index) for k, v in state.items()}


@torch.no_grad()
def greedy(model: NIC, images: torch.Tensor, max_len: int = 20) -> tuple[list[list[int]], torch.Tensor]:
    """The most likely next word at every step, until EOS (after `max_len` words EOS is the only choice): (word
    ids without BOS/EOS per image, (B,) summed log-probabilities of the words and the EOS)."""
    state = model.start(images)
    b = images.shape[0]
    tokens = torch.full((b,), BOS, dtype=torch.long, device=images.device)
    done = torch.zeros(b, dtype=torch.bool, device=images.device)
    score = torch.zeros(b, device=images.device)
    words = []
    for t in range(max_len + 1):
        logp, state, _ = model.step(tokens, state)
        if t == max_len:
            logp = _only_eos(logp)
        best, tokens = logp.max(-1)
        score += torch.where(done, 0.0, best)
        tokens = torch.where(done, PAD, tokens)
        words.append(tokens)
        done |= tokens == EOS
        if bool(done.all()):
            break
    return [_cut(seq) for seq in torch.stack(words, 1).tolist()], score.cpu()


@torch.no_grad()
def beam_search(model: NIC, images: torch.Tensor, beam_size: int = 3, max_len: int = 20,
                length_norm: float = 0.0) -> tuple[list[list[int]], torch.Tensor]:
    """Beam search: the `beam_size` best partial captions of every image are extended by every word and the
    best `beam_size` kept, finished ones (EOS) carried along, EOS the only choice after `max_len` words. The
    answer is the caption with the best log-probability / length ** `length_norm` (0: the plain
    log-probability; 1: per word) among the beam's and greedy search's: pruning can drop the prefix greedy
    search follows, and then plain beam search can end below greedy. Returns (word ids per image, (B,) their
    summed log-probabilities, EOS included)."""
    if beam_size < 1:
        raise LabError(f"decode.beam_size={beam_size} must be at least 1")
    b, k = images.shape[0], int(beam_size)
    dev = images.device
    state = reorder(model.start(images), torch.arange(b, device=dev).repeat_interleave(k))
    tokens = torch.full((b * k,), BOS, dtype=torch.long, device=dev)
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # one live beam at first, so the first step keeps k different words
    seqs = torch.zeros((b * k, 0), dtype=torch.long, device=dev)
    done = torch.zeros(b * k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b * k, device=dev)
    for t in range(max_len + 1):
        logp, state, _ = model.step(tokens, state)
        if t == max_len:
            logp = _only_eos(logp)
        v = logp.shape[-1]
        logp = torch.where(done.unsqueeze(1), float("-inf"), logp)
        logp[:, PAD] = torch.where(done, 0.0, float("-inf"))  # a finished caption only grows padding, for free
        top, idx = (scores.view(-1, 1) + logp).view(b, k * v).topk(k, dim=1)
        origin = (torch.arange(b, device=dev).unsqueeze(1) * k + idx // v).view(-1)
        tokens = (idx % v).view(-1)
        state, seqs = reorder(state, origin), torch.cat([seqs[origin], tokens.unsqueeze(1)], 1)
        lengths = lengths[origin] + (~done[origin]).float()
        done = done[origin] | (tokens == EOS)
        scores = top
        if bool(done.all()):
            break
    ranked = scores.view(-1) / lengths.clamp(min=1) ** float(length_norm) if length_norm else scores.view(-1)
    best = ranked.view(b, k).argmax(1) + torch.arange(b, device=dev) * k
    ids, score, rank = [_cut(seq) for seq in seqs[best].tolist()], scores.view(-1)[best], ranked[best]
    if k > 1:  # a pruned prefix may have been greedy's: the greedy caption competes too, so a beam never loses to it
        g_ids, g_score = greedy(model, images, max_len)
        g_rank = g_score / torch.tensor([len(c) + 1.0 for c in g_ids]) ** float(length_norm)
        won = (g_rank > rank.cpu()).tolist()
        ids = [g if w else c for g, c, w in zip(g_ids, ids, won)]
        score = torch.where(torch.tensor(won), g_score, score.cpu())
    return ids, score.cpu()


@torch.no_grad()
def sequence_logprob(model: NIC, images: torch.Tensor, captions: Sequence[Sequence[int]]
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B,) the model's log-probability of each caption (word ids, without BOS/EOS) followed by EOS, and the
    attention (B, T, L) of each word and the EOS (None without attention)."""
    t = max(len(c) for c in captions) + 1
    inputs = torch.full((len(captions), t), PAD, dtype=torch.long, device=images.device)
    targets = torch.full_like(inputs, PAD)
    for i, c in enumerate(captions):
        seq = torch.tensor([BOS, *c, EOS], device=images.device)
        inputs[i, : len(c) + 1], targets[i, : len(c) + 1] = seq[:-1], seq[1:]
    logits, alphas = model(images, inputs)
    logp = _word_logprobs(logits).gather(2, targets.unsqueeze(2)).squeeze(2)
    return torch.where(targets != PAD, logp, 0.0).sum(1).cpu(), None if alphas is None else alphas.cpu()


def _word_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next word; padding and the start word are never written."""
    logits = logits.float()
    logits[..., [PAD, BOS]] = float("-inf")
    return logits.log_softmax(-1)


def _only_eos(logp: torch.Tensor) -> torch.Tensor:
    """After `max_len` words the caption ends: EOS keeps its log-probability, every other word is ruled out."""
    out = torch.full_like(logp, float("-inf"))
    out[:, EOS] = logp[:, EOS]
    return out


def _cut(seq: Sequence[int]) -> list[int]:
    """Word ids up to (without) the first EOS, padding dropped."""
    out = []
    for i in seq:
        if i == EOS:
            break
        if i != PAD:
            out.append(i)
    return out
