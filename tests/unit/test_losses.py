"""The chunked catalogue loss equals the reference cross-entropy, in value and in gradients."""

import math

import numpy as np
import pytest
import torch

from stratarec.config import ModelConfig
from stratarec.model.losses import linear_cross_entropy
from stratarec.model.sequential import Architecture, SequentialRecommender

pytestmark = pytest.mark.unit


def test_hand_computed_two_rows():
    # Row 1: logits (0, 0) with target 0 -> loss ln 2. Row 2: logits (2, 0) with target 1 ->
    # loss ln(1 + e^2) - 0. Mean over the two rows.
    hidden = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.tensor([0, 1]), chunk_size=1)
    expected = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d loss / d hidden_1 = (softmax - onehot) @ W / 2 = ([0.5, 0.5] - [1, 0]) @ W / 2 = [-0.5, 0.25]
    assert hidden.grad[0].tolist() == pytest.approx([-0.5, 0.25], rel=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_reference_loss_and_gradients(chunk_size):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(50, 8, generator=gen, requires_grad=True)
    w = torch.randn(30, 8, generator=gen, requires_grad=True)
    t = torch.randint(0, 30, (50,), generator=gen)
    ref = torch.nn.functional.cross_entropy(h @ w.T, t)
    gh_ref, gw_ref = torch.autograd.grad(ref * 3.0, (h, w))
    ours = linear_cross_entropy(h, w, t, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad(ours * 3.0, (h, w))  # a non-unit upstream gradient is passed through
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(gh, gh_ref, atol=1e-6) and torch.allclose(gw, gw_ref, atol=1e-6)


def test_bf16_products_stay_close():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(64, 16, generator=gen)
    w = torch.randn(40, 16, generator=gen) * 0.3
    t = torch.randint(0, 40, (64,), generator=gen)
    ref = torch.nn.functional.cross_entropy(h @ w.T, t).item()
    assert linear_cross_entropy(h, w, t, low_precision=True).item() == pytest.approx(ref, rel=2e-2)


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="share d"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


def test_unmasked_causal_encoding_equals_masked_on_real_positions():
    """Training drops the attention mask for right-padded causal rows: real positions must not change."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=16, num_heads=2, num_layers=2, max_len=12, text_init=False, attention_dropout=0.0)
    model = SequentialRecommender(Architecture.from_config(cfg, 20, 1)).eval()
    items = torch.tensor([[3, 4, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    mask = (items > 0).long()
    with torch.no_grad():
        masked = model.encode(items, mask)
        unmasked = model.encode(items, None)
    real = mask.bool()
    assert torch.allclose(masked[real], unmasked[real], atol=1e-5)


def test_attention_dropout_defaults_to_dropout_for_old_bundles():
    fields = dict(n_items=5, text_dim=1, kind="causal", hidden_size=8, num_layers=1, num_heads=1, dropout=0.3, max_len=4, text_init=False)
    assert Architecture(**fields).attention_dropout_rate == 0.3
    assert Architecture(**fields, attention_dropout=0.0).attention_dropout_rate == 0.0
    assert np.isclose(SequentialRecommender(Architecture(**fields, attention_dropout=0.1)).encoder.config.attn_pdrop, 0.1)
