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
from stratarec.sequences import length_grouped_batches, pad_right

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
    attention_dropout: float | None = None  # None: same as dropout (bundles saved before this field)
    id_shrinkage: float = 0.0  # 0: ID rows at full weight (bundles saved before this field)
    positions: str = "from_start"  # bundles saved before this field count positions from the first item
    id_dropout: float = 0.0  # training only; bundles saved before this field had none

    @property
    def attention_dropout_rate(self) -> float:
        """Dropout on attention probabilities."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout

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
            attention_dropout=cfg.attention_dropout,
            id_shrinkage=cfg.id_shrinkage if cfg.text_init else 0.0,
            positions=cfg.positions,
            id_dropout=cfg.id_dropout if cfg.text_init else 0.0,
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
        # Per-row weight of the ID part, c / (c + id_shrinkage) for an item with c training
        # events (see set_item_counts): a rare item's ID row has seen too few positives to be
        # trusted, so its score leans on text. Ones = plain ID + text rows.
        self.register_buffer("id_scale", torch.ones(n_rows))
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
                    attn_pdrop=arch.attention_dropout_rate,
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
                    attention_probs_dropout_prob=arch.attention_dropout_rate,
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

    def set_item_counts(self, counts: np.ndarray | torch.Tensor) -> None:
        """Set the ID-row weights from (n_items + 1,) training-event counts per row (row 0 = padding).

        A no-op unless the architecture has ``id_shrinkage > 0`` and text rows to lean on.
        """
        if self.arch.id_shrinkage <= 0 or self.text_projection is None:
            return
        c = torch.as_tensor(np.asarray(counts), dtype=torch.float32).reshape(-1)
        if c.shape[0] != self.arch.n_items + 1:
            raise ValueError(f"counts must have n_items + 1 = {self.arch.n_items + 1} entries, got {c.shape[0]}")
        scale = torch.ones_like(self.id_scale)
        scale[: c.shape[0]] = c / (c + self.arch.id_shrinkage)
        self.id_scale.copy_(scale.to(self.id_scale.device))

    def item_matrix(self) -> torch.Tensor:
        """All item rows, shape (n_items + 2, d)."""
        weight = self.id_embedding.weight
        scale = self.id_scale if self.arch.id_shrinkage > 0 else None
        if self.training and self.arch.id_dropout > 0 and self.text_projection is not None:
            # Rows whose ID part is dropped this pass are scored from text alone, like a new item.
            p = self.arch.id_dropout
            keep = (torch.rand(weight.shape[0], device=weight.device) >= p).to(weight.dtype) / (1.0 - p)
            keep[self.arch.n_items + 1 :] = 1.0  # the mask token has no text to fall back on
            scale = keep if scale is None else scale * keep
        if scale is not None:
            weight = weight * scale[:, None]
        if self.text_projection is not None:
            weight = weight + self.text_projection(self.text_embeddings)
        return weight

    def encode(self, items: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Contextual states for each position.

        Args:
            items: (B, T) item indices, right-padded with 0.
            attention_mask: (B, T) 1 for real positions. A causal stack may get None for
                right-padded rows: no real position attends to a later (padded) one, and
                without a mask the attention runs as one fused causal kernel.

        Returns:
            (B, T, d) hidden states.
        """
        table = self.item_matrix()
        x = self.embedding_dropout(self.embedding_norm(table[items]))  # (B, T, d)
        position_ids = self.position_ids(items) if self.arch.positions == "from_end" else None
        out = self.encoder(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state

    def position_ids(self, items: torch.Tensor) -> torch.Tensor:
        """Recency-aligned positions of right-padded rows: each row's last real item sits at ``max_len - 1``.

        The same computation as left padding, without its attention mask: the newest item of
        every history (the one whose state is scored) always has the same position embedding,
        so that embedding is trained by every user's last step, not only by the longest users'.
        Padding after the last item gets clamped positions; nothing real attends to it.
        """
        lengths = (items > 0).sum(dim=1, keepdim=True)
        t = torch.arange(items.shape[1], device=items.device)[None, :]
        return (t + self.arch.max_len - lengths).clamp(0, self.arch.max_len - 1)

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
    state.setdefault("id_scale", torch.ones_like(model.id_scale))  # bundles saved before id_scale existed
    model.load_state_dict(state)
    return model.to(device).eval()


class InferenceScorer:
    """A frozen, inference-only view of a :class:`SequentialRecommender` for serving.

    Gives the numbers of ``model.logits(model.user_states(items, lengths))`` (to float
    rounding) at a fraction of the cost per request:

    * the item table (``id_embedding + proj(text_embeddings)``), its embedding LayerNorm
      (a per-row operation, so normalising the whole table once equals normalising the rows
      a request gathers) and the logits weight are computed once, not twice per forward pass;
    * a causal (GPT-2) stack runs as plain tensor operations on the module's own weights,
      without the Hugging Face wrappers (cache objects, mask builders, config lookups), and
      its last block computes only the positions whose states are returned. Right padding
      needs no attention mask under causal attention: a real position never attends to a
      later (padded) one;
    * a bidirectional (BERT) stack keeps the Hugging Face encoder, fed from the precomputed table.

    The model's weights are snapshotted: build a new scorer after changing them. Every tensor
    here is read-only, so one scorer may serve several threads at once. Training never uses it.
    """

    def __init__(self, model: SequentialRecommender, low_precision: bool = False, chunk_rows: int = 64) -> None:
        """Snapshot ``model`` for inference.

        Args:
            model: The trained recommender.
            low_precision: Run the transformer in bf16 autocast (CPUs with AVX512-BF16/AMX):
                ~1.7x faster for large batches, scores within ~0.5% of fp32, so near-ties may
                swap. For offline batch scoring; serving keeps fp32.
            chunk_rows: Rows per forward pass when a batch is larger (grouped by history length).
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = chunk_rows
        self.model = model.eval()
        self.low_precision = low_precision
        arch = model.arch
        self.n_items = arch.n_items
        self.causal = arch.kind == "causal"
        # Bidirectional models append a mask token, so they see one fewer history item.
        self.history_len = arch.max_len - (0 if self.causal else 1)
        with torch.inference_mode():
            table = model.item_matrix()
            self.embedded = model.embedding_norm(table)  # (n_items + 2, d); dropout is off in eval
            self.logit_table = table[1 : arch.n_items + 1]  # (n_items, d), as model.logits slices it
        self._blocks = self._gpt2_weights() if self.causal else None

    @property
    def lean(self) -> bool:
        """True when the causal stack runs as plain tensor operations (else the Hugging Face encoder runs)."""
        return self._blocks is not None

    def _gpt2_weights(self) -> list[tuple] | None:
        """The causal stack's weights, or None if its configuration is not the plain one handled here."""
        enc = self.model.encoder
        cfg = enc.config
        plain = (
            cfg.activation_function == "gelu"
            and not cfg.add_cross_attention
            and not getattr(cfg, "reorder_and_upcast_attn", False)
            and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        )
        if not plain:
            return None
        self._wpe = enc.wpe.weight.detach()
        self._ln_f = (enc.ln_f.weight.detach(), enc.ln_f.bias.detach(), enc.ln_f.eps)
        blocks = []
        for block in enc.h:
            attn, mlp = block.attn, block.mlp
            blocks.append(
                (
                    (block.ln_1.weight.detach(), block.ln_1.bias.detach(), block.ln_1.eps),
                    (attn.c_attn.weight.detach(), attn.c_attn.bias.detach()),
                    (attn.c_proj.weight.detach(), attn.c_proj.bias.detach()),
                    (block.ln_2.weight.detach(), block.ln_2.bias.detach(), block.ln_2.eps),
                    (mlp.c_fc.weight.detach(), mlp.c_fc.bias.detach()),
                    (mlp.c_proj.weight.detach(), mlp.c_proj.bias.detach()),
                    attn.num_heads,
                    float(attn.scaling),
                )
            )
        return blocks

    def user_states(self, items: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """(B, d) states that score the next item, like :meth:`SequentialRecommender.user_states`.

        Args:
            items: (B, T) right-padded item rows, every row with at least one item
                (at most ``history_len`` per row).
            lengths: (B,) number of real items per row, all >= 1.
        """
        with torch.inference_mode():
            rows = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64))
            last = torch.from_numpy(np.asarray(lengths, dtype=np.int64)) - 1
            if self._blocks is not None:
                return self._causal_states(rows, last)
            if not self.causal:  # append the mask token after each history, as user_states does
                rows = torch.cat([rows, torch.zeros_like(rows[:, :1])], dim=1)
                last = last + 1
                rows[torch.arange(rows.shape[0]), last] = self.model.mask_token
            mask = (torch.arange(rows.shape[1])[None, :] <= last[:, None]).long()
            position_ids = self.model.position_ids(rows) if self.model.arch.positions == "from_end" else None
            hidden = self.model.encoder(inputs_embeds=self.embedded[rows], attention_mask=mask, position_ids=position_ids).last_hidden_state
            return hidden[torch.arange(rows.shape[0]), last]

    def _causal_states(self, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        F = torch.nn.functional
        batch, width = rows.shape
        d = self.embedded.shape[1]
        if self.model.arch.positions == "from_end":
            positions = (torch.arange(width)[None, :] + self.model.arch.max_len - 1 - last[:, None]).clamp(0, self.model.arch.max_len - 1)
            h = self.embedded[rows] + self._wpe[positions]  # (B, T, d); position dropout is off in eval
        else:
            h = self.embedded[rows] + self._wpe[:width]
        pick = torch.arange(batch)
        n_blocks = len(self._blocks)
        for i, (ln1, qkv_w, proj_w, ln2, fc_w, fc_proj_w, heads, scaling) in enumerate(self._blocks):
            a = F.layer_norm(h, (d,), ln1[0], ln1[1], ln1[2])
            qkv = torch.addmm(qkv_w[1], a.view(-1, d), qkv_w[0]).view(batch, width, 3 * d)
            q, k, v = qkv.split(d, dim=2)
            k = k.view(batch, width, heads, -1).transpose(1, 2)
            v = v.view(batch, width, heads, -1).transpose(1, 2)
            if i < n_blocks - 1:
                q = q.view(batch, width, heads, -1).transpose(1, 2)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=width > 1, scale=scaling)
                o = o.transpose(1, 2).reshape(batch * width, d)
                h = torch.addmm(proj_w[1], o, proj_w[0]).view(batch, width, d) + h
                m = F.layer_norm(h, (d,), ln2[0], ln2[1], ln2[2]).view(-1, d)
            else:
                # The last block: only each row's last real position is returned, so only its
                # query, attention output and MLP are computed (keys and values need every position).
                q = q[pick, last].view(batch, 1, heads, -1).transpose(1, 2)  # (B, H, 1, hd)
                mask = None
                if batch > 1 or int(last[0]) != width - 1:
                    mask = (torch.arange(width)[None, :] <= last[:, None]).view(batch, 1, 1, width)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
                o = o.transpose(1, 2).reshape(batch, d)
                h = torch.addmm(proj_w[1], o, proj_w[0]) + h[pick, last]  # (B, d)
                m = F.layer_norm(h, (d,), ln2[0], ln2[1], ln2[2])
            m = torch.addmm(fc_proj_w[1], F.gelu(torch.addmm(fc_w[1], m, fc_w[0])), fc_proj_w[0])
            h = h + m.view(h.shape)
        ln_f = self._ln_f
        return F.layer_norm(h, (d,), ln_f[0], ln_f[1], ln_f[2])

    def states(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(B, d) user states for non-empty histories of item rows (oldest first).

        Each history is cut to its last ``history_len`` items, as :class:`~stratarec.training.ModelScorer` does.
        A batch larger than ``chunk_rows`` runs as chunks of similar length: padding every row to
        the batch's longest history wastes most of the work when lengths vary (on ML-1M, 256 random
        users hold 28k real items in a 51k-slot padded batch). The states do not depend on the
        chunking: under causal attention a row's state never sees its padding.
        """
        if any(len(h) == 0 for h in histories):
            raise ValueError("InferenceScorer needs non-empty histories")
        if len(histories) <= self.chunk_rows:
            return self._states_of(*pad_right(histories, self.history_len))
        out: torch.Tensor | None = None
        for rows, items, lens in length_grouped_batches(histories, self.history_len, self.chunk_rows):
            part = self._states_of(items, lens)
            if out is None:
                out = torch.empty(len(histories), part.shape[1], dtype=part.dtype)
            out[torch.from_numpy(rows)] = part
        return out

    def _states_of(self, items: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        if not self.low_precision:
            return self.user_states(items, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = self.user_states(items, lengths)
        return states.float()

    def scores_of(self, states: torch.Tensor) -> np.ndarray:
        """(B, n_items) float32 scores of (B, d) user states."""
        with torch.inference_mode():
            return (states @ self.logit_table.T).numpy()

    def score(self, histories: list[np.ndarray]) -> np.ndarray:
        """(B, n_items) float32 scores for non-empty histories of item rows (oldest first)."""
        return self.scores_of(self.states(histories))
