"""Item rows of text-init models: ID shrinkage for rare items and ID dropout while training."""

import numpy as np
import pytest
import torch

from stratarec.config import ModelConfig
from stratarec.model.sequential import Architecture, SequentialRecommender

pytestmark = pytest.mark.unit

N_ITEMS, TEXT_DIM = 6, 4


def make_model(**model_fields) -> SequentialRecommender:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=8, num_heads=2, num_layers=1, max_len=5, text_init=True, **model_fields)
    text = np.random.default_rng(0).normal(size=(N_ITEMS, TEXT_DIM)).astype(np.float32)
    model = SequentialRecommender(Architecture.from_config(cfg, N_ITEMS, TEXT_DIM), text)
    with torch.no_grad():
        model.id_embedding.weight.normal_()  # text-init models start ID rows at zero; give them values to see
    return model


def test_shrinkage_weighs_id_rows_by_count():
    model = make_model(id_shrinkage=5.0).eval()
    counts = np.array([0, 0, 5, 15, 95, 1, 3])  # row 0 is padding; item 1 was never seen
    model.set_item_counts(counts)
    with torch.no_grad():
        text_part = model.text_projection(model.text_embeddings)
        id_part = model.item_matrix() - text_part
        expected = model.id_embedding.weight * torch.tensor([0, 0, 0.5, 0.75, 0.95, 1 / 6, 3 / 8, 1.0])[:, None]
    assert torch.allclose(id_part, expected, atol=1e-6)  # an unseen item is its text alone


def test_id_dropout_only_while_training():
    model = make_model(id_dropout=0.5)
    model.eval()
    with torch.no_grad():
        a, b = model.item_matrix(), model.item_matrix()
        full = model.id_embedding.weight + model.text_projection(model.text_embeddings)
    assert torch.equal(a, b) and torch.allclose(a, full)

    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        rows = model.item_matrix()
        text_part = model.text_projection(model.text_embeddings)
    id_part = rows - text_part
    dropped = id_part.abs().sum(dim=1) < 1e-6
    kept = torch.isclose(id_part, 2.0 * model.id_embedding.weight, atol=1e-5).all(dim=1)  # 1 / (1 - 0.5)
    catalogue = slice(1, N_ITEMS + 1)
    assert bool((dropped | kept)[catalogue].all())  # every item row is either text alone or its scaled full row
    assert 0 < int(dropped[catalogue].sum()) < N_ITEMS
    # The mask token has no text to fall back on: never dropped, never rescaled.
    assert torch.allclose(id_part[N_ITEMS + 1], model.id_embedding.weight[N_ITEMS + 1], atol=1e-6)


def test_id_dropout_is_off_without_text():
    cfg = ModelConfig(hidden_size=8, num_heads=2, num_layers=1, max_len=5, text_init=False, id_dropout=0.5)
    assert Architecture.from_config(cfg, N_ITEMS, 1).id_dropout == 0.0


def test_id_dropout_must_be_a_probability():
    with pytest.raises(ValueError, match="id_dropout"):
        ModelConfig(id_dropout=1.0)
