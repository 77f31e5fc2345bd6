"""Transformer sequential recommender on Hugging Face model classes.

Two encoders share one item-embedding scheme:

* ``causal``: a GPT-2 stack (SASRec-like). Position *t* predicts the item at *t + 1*.
* ``bidirectional``: a BERT stack (BERT4Rec-like). Masked positions predict their item.

Item rows are ``id_embedding[i] + proj(text_embedding[i])``. The text part comes from a
frozen pretrained sentence encoder, so an item that never appeared in training still has
a meaningful vector and can be recommended; the ID part starts at zero and learns what text
cannot say. Output logits reuse the same matrix (weight tying), the strongest simple
choice for full-softmax training of sequential recommenders.

Item index 0 is padding; catalogue items are 1..n_items; bidirectional models use
``n_items + 1`` as the mask token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from stratarec.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "architecture.json"


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild the network before loading its weights."""

    n_items: int
    text_dim: int
    kind: str
    hidden_size: int
    num_layers: int
    num_heads: int
    dropout: float
    max_len: int
    text_init: bool

    @classmethod
    def from_config(cls, cfg: ModelConfig, n_items: int, text_dim: int) -> Architecture:
        """Build from the model config and the catalogue size."""
        return cls(
            n_items=n_items,
            text_dim=text_dim,
            kind=cfg.architecture,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            dropout=cfg.dropout,
            max_len=cfg.max_len,
            text_init=cfg.text_init,
        )


class SequentialRecommender(nn.Module):
    """Transformer over item sequences with text-initialised, tied item embeddings."""

    def __init__(self, arch: Architecture, text_embeddings: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        self.arch = arch
        n_rows = arch.n_items + 2  # padding, items, mask token
        d = arch.hidden_size
        # Text vectors are a frozen buffer: they are inputs, not parameters, and they travel
        # with the weights so serving needs no text encoder.
        text = torch.zeros(n_rows, arch.text_dim)
        if text_embeddings is not None:
            t = torch.as_tensor(np.asarray(text_embeddings), dtype=torch.float32)
            if t.shape != (arch.n_items, arch.text_dim):
                raise ValueError(f"text_embeddings must have shape ({arch.n_items}, {arch.text_dim}), got {tuple(t.shape)}")
            text[1 : arch.n_items + 1] = t
        self.register_buffer("text_embeddings", text)
        self.id_embedding = nn.Embedding(n_rows, d, padding_idx=0)
        if arch.text_init:
            self.text_projection: nn.Linear | None = nn.Linear(arch.text_dim, d)
            # ID rows start at zero so the first forward pass ranks purely by text similarity.
            nn.init.zeros_(self.id_embedding.weight)
        else:
            self.text_projection = None
            nn.init.normal_(self.id_embedding.weight, std=0.02)
            with torch.no_grad():
                self.id_embedding.weight[0].zero_()
        self.embedding_norm = nn.LayerNorm(d)
        self.embedding_dropout = nn.Dropout(arch.dropout)
        if arch.kind == "causal":
            self.encoder = GPT2Model(
                GPT2Config(
                    vocab_size=1,  # unused: the stack always receives inputs_embeds
                    n_positions=arch.max_len,
                    n_embd=d,
                    n_layer=arch.num_layers,
                    n_head=arch.num_heads,
                    n_inner=4 * d,
                    resid_pdrop=arch.dropout,
                    embd_pdrop=arch.dropout,
                    attn_pdrop=arch.dropout,
                    activation_function="gelu",
                    bos_token_id=None,
                    eos_token_id=None,
                )
            )
        elif arch.kind == "bidirectional":
            self.encoder = BertModel(
                BertConfig(
                    vocab_size=1,
                    hidden_size=d,
                    num_hidden_layers=arch.num_layers,
                    num_attention_heads=arch.num_heads,
                    intermediate_size=4 * d,
                    hidden_dropout_prob=arch.dropout,
                    attention_probs_dropout_prob=arch.dropout,
                    max_position_embeddings=arch.max_len,
                    pad_token_id=None,
                ),
                add_pooling_layer=False,
            )
        else:
            raise ValueError(f"model.architecture must be 'causal' or 'bidirectional', got {arch.kind!r}")

    @property
    def mask_token(self) -> int:
        """Index of the [MASK] row (bidirectional models)."""
        return self.arch.n_items + 1

    def item_matrix(self) -> torch.Tensor:
        """All item rows, shape (n_items + 2, d)."""
        weight = self.id_embedding.weight
        if self.text_projection is not None:
            weight = weight + self.text_projection(self.text_embeddings)
        return weight

    def encode(self, items: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Contextual states for each position.

        Args:
            items: (B, T) item indices, right-padded with 0.
            attention_mask: (B, T) 1 for real positions.

        Returns:
            (B, T, d) hidden states.
        """
        table = self.item_matrix()
        x = self.embedding_dropout(self.embedding_norm(table[items]))  # (B, T, d)
        out = self.encoder(inputs_embeds=x, attention_mask=attention_mask)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over catalogue items 1..n_items for hidden states (..., d) -> (..., n_items)."""
        table = self.item_matrix()[1 : self.arch.n_items + 1]
        return hidden @ table.T

    def user_states(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The representation that scores the next item for each sequence.

        Args:
            items: (B, T) right-padded histories (at most max_len - 1 items for
                bidirectional models, which append a mask token).
            lengths: (B,) number of real items per row.

        Returns:
            (B, d) user interest vectors.
        """
        if self.arch.kind == "bidirectional":
            batch = torch.arange(items.shape[0], device=items.device)
            items = torch.cat([items, torch.zeros_like(items[:, :1])], dim=1)
            items[batch, lengths] = self.mask_token
            lengths = lengths + 1
        positions = torch.arange(items.shape[1], device=items.device)
        mask = (positions[None, :] < lengths[:, None]).long()
        hidden = self.encode(items, mask)
        return hidden[torch.arange(items.shape[0], device=items.device), (lengths - 1).clamp(min=0)]


def save_model(model: SequentialRecommender, directory: Path) -> None:
    """Write weights (safetensors) and architecture (JSON) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(directory / WEIGHTS_FILE)
    tmp_arch = directory / (ARCH_FILE + ".tmp")
    tmp_arch.write_text(json.dumps(asdict(model.arch), indent=2))
    tmp_arch.replace(directory / ARCH_FILE)


def load_model(directory: Path, device: str | torch.device = "cpu") -> SequentialRecommender:
    """Rebuild a model from :func:`save_model` output. Weights come from safetensors only."""
    arch = Architecture(**json.loads((Path(directory) / ARCH_FILE).read_text()))
    model = SequentialRecommender(arch)
    state = load_file(str(Path(directory) / WEIGHTS_FILE), device=str(device))
    model.load_state_dict(state)
    return model.to(device).eval()
