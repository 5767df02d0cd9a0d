"""A small torch model zoo for the bridge optimizers (tests/test_zoo_torch.py).

Each :class:`Zoo` entry builds a deterministic model (``build(seed)``), a fixed batch per step
(``batch(step)``) and its scalar loss (``loss(model, batch)``). The models cover the parameter
layouts a torch optimizer meets in practice:

* ``encoder``: ``nn.TransformerEncoderLayer`` — ``nn.MultiheadAttention`` with its fused
  ``in_proj_weight`` ``(3E, E)`` and ``in_proj_bias`` ``(3E,)``, ``out_proj``, a feed-forward
  pair and two LayerNorms;
* ``convnet``: ``nn.Conv2d`` kernels ``(out, in, kh, kw)`` (one ``(64, 64, 3, 3)``: 36,864
  elements, compressed by TurboAdam's default ``min_compress_elements=4096``) with
  ``nn.BatchNorm2d`` (trained affine parameters and running-statistics buffers) and a
  ``Linear`` classifier;
* ``gpt2``: a random-init Hugging Face ``GPT2LMHeadModel`` (``Conv1D`` weights stored
  ``(in, out)``, a fused ``c_attn`` ``(E, 3E)``, the output head tied to ``wte``);
* ``bert``: a random-init ``BertForSequenceClassification`` (separate q/k/v ``Linear`` s,
  embeddings, pooler and classifier).

No network: the Hugging Face models come from configs (never ``from_pretrained``) and the token
ids from a seeded ``torch.Generator``. Dropout is 0 everywhere, so a step depends only on the
parameters and the batch (the resume tests compare runs bit for bit).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

F = torch.nn.functional

#: Width of the attention models (E): ``in_proj_weight`` is ``(3E, E)``.
EMBED = 32
HEADS = 4
VOCAB = 128
SEQ = 16
BATCH = 4


@dataclasses.dataclass(frozen=True)
class Zoo:
  """One model of the zoo.

  Attributes:
    name: test id.
    build: ``seed -> nn.Module`` (deterministic; the same seed gives the same parameters).
    batch: ``step -> batch`` (deterministic, the same for every optimizer and run).
    loss: ``(model, batch) -> scalar loss tensor``.
    hf: a Hugging Face model (``transformers.Trainer`` can train it).
  """

  name: str
  build: Callable[[int], torch.nn.Module]
  batch: Callable[[int], Any]
  loss: Callable[[torch.nn.Module, Any], torch.Tensor]
  hf: bool = False


def _gen(step: int, salt: int) -> torch.Generator:
  return torch.Generator().manual_seed(1000 * salt + step)


# ----------------------------------------------------------------------------- encoder
class EncoderNet(torch.nn.Module):
  """``nn.TransformerEncoderLayer`` (batch-first, no dropout) and a linear head."""

  def __init__(self):
    super().__init__()
    self.layer = torch.nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=2 * EMBED,
                                                  dropout=0.0, batch_first=True)
    self.head = torch.nn.Linear(EMBED, 4)

  def forward(self, x):
    return self.head(self.layer(x).mean(dim=1))


def build_encoder(seed: int = 0) -> torch.nn.Module:
  """The encoder model (``layer.self_attn.in_proj_weight`` is ``(3E, E)``)."""
  torch.manual_seed(seed)
  return EncoderNet()


def encoder_batch(step: int):
  """``(x (B, T, E), y (B, 4))``, fixed per step."""
  g = _gen(step, 1)
  return torch.randn(BATCH, 8, EMBED, generator=g), torch.randn(BATCH, 4, generator=g)


def encoder_loss(model, batch):
  x, y = batch
  return F.mse_loss(model(x), y)


# ----------------------------------------------------------------------------- conv net
class ConvNet(torch.nn.Module):
  """conv(3→64) + BN + ReLU, conv(64→64) + BN + ReLU, global average pool, linear classifier
  (64→10)."""

  def __init__(self, width: int = 64):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, width, 3, padding=1)
    self.bn1 = torch.nn.BatchNorm2d(width)
    self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)
    self.bn2 = torch.nn.BatchNorm2d(width)
    self.classifier = torch.nn.Linear(width, 10)

  def forward(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = F.relu(self.bn2(self.conv2(h)))
    return self.classifier(h.mean(dim=(2, 3)))


def build_convnet(seed: int = 0) -> torch.nn.Module:
  """The conv net (``conv2.weight`` is ``(64, 64, 3, 3)``)."""
  torch.manual_seed(seed)
  return ConvNet()


def convnet_batch(step: int):
  """``(images (B, 3, 8, 8), labels (B,))``, fixed per step."""
  g = _gen(step, 2)
  return torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def convnet_loss(model, batch):
  x, y = batch
  return F.cross_entropy(model(x), y)


# ----------------------------------------------------------------------------- Hugging Face
def gpt2_config():
  """A tiny GPT-2 (2 layers, E=32, 4 heads, vocabulary 128, 32 positions, no dropout)."""
  from transformers import GPT2Config  # pylint: disable=import-outside-toplevel
  return GPT2Config(n_layer=2, n_embd=EMBED, n_head=HEADS, vocab_size=VOCAB, n_positions=32,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                    eos_token_id=0)


def build_gpt2(seed: int = 0) -> torch.nn.Module:
  """A random-init ``GPT2LMHeadModel`` (``lm_head`` tied to ``transformer.wte``)."""
  from transformers import GPT2LMHeadModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  return GPT2LMHeadModel(gpt2_config())


def bert_config():
  """A tiny BERT (2 layers, E=32, 4 heads, FFN 64, vocabulary 128, 3 labels, no dropout)."""
  from transformers import BertConfig  # pylint: disable=import-outside-toplevel
  return BertConfig(vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=2,
                    num_attention_heads=HEADS, intermediate_size=2 * EMBED,
                    max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, classifier_dropout=0.0)


def build_bert(seed: int = 0) -> torch.nn.Module:
  """A random-init ``BertForSequenceClassification``."""
  from transformers import BertForSequenceClassification  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  return BertForSequenceClassification(bert_config())


def token_ids(step: int, salt: int = 3, n: int = BATCH) -> torch.Tensor:
  """``(n, SEQ)`` int64 token ids, fixed per step (no tokenizer)."""
  return torch.randint(0, VOCAB, (n, SEQ), generator=_gen(step, salt))


def gpt2_batch(step: int) -> dict:
  ids = token_ids(step, 3)
  return {"input_ids": ids, "labels": ids}


def bert_batch(step: int) -> dict:
  g = _gen(step, 4)
  return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
          "labels": torch.randint(0, 3, (BATCH,), generator=g)}


def hf_loss(model, batch):
  return model(**batch).loss


class TokenDataset(torch.utils.data.Dataset):
  """A fixed, deterministic dataset of token ids for ``transformers.Trainer``.

  ``kind="gpt2"``: ``{"input_ids", "labels"}`` with labels = ids (causal LM);
  ``kind="bert"``: ``{"input_ids", "labels"}`` with a class label in ``[0, 3)``.
  """

  def __init__(self, kind: str, n: int = 16, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    self.labels = self.ids if kind == "gpt2" else torch.randint(0, 3, (n,), generator=g)

  def __len__(self):
    return len(self.ids)

  def __getitem__(self, i):
    return {"input_ids": self.ids[i], "labels": self.labels[i]}


ZOO = [
    Zoo("encoder", build_encoder, encoder_batch, encoder_loss),
    Zoo("convnet", build_convnet, convnet_batch, convnet_loss),
    Zoo("gpt2", build_gpt2, gpt2_batch, hf_loss, hf=True),
    Zoo("bert", build_bert, bert_batch, hf_loss, hf=True),
]
BY_NAME = {z.name: z for z in ZOO}


def param_bytes(p: torch.Tensor) -> int:
  """Bytes of one tensor (numel × element size)."""
  return p.numel() * p.element_size()
