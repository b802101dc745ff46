"""One key mask, every library's format: each format masks the same keys."""

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from timm.models.vision_transformer import Block

from prato_exp.tokens.attention_mask import KeyMask, KeyPolicy, reduced_key_keep, reduced_key_policy

KEEP = torch.tensor([[True, False, True, True], [True, True, True, False]])


def _qkv(b: int = 2, heads: int = 3, n: int = 4, d: int = 5):
    torch.manual_seed(0)
    return torch.randn(b, heads, n, d), torch.randn(b, heads, n, d), torch.randn(b, heads, n, d)


def test_softmax_gives_masked_keys_zero_weight_and_renormalises_the_rest():
    logits = torch.zeros(2, 1, 1, 4)
    weights = KeyMask(KEEP).softmax(logits)
    assert weights[0, 0, 0].tolist() == pytest.approx([1 / 3, 0.0, 1 / 3, 1 / 3])
    assert weights[1, 0, 0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])


def test_sdpa_bool_mask_equals_the_hand_written_masked_softmax():
    q, k, v = _qkv()
    by_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=KeyMask(KEEP).sdpa())
    by_hand = KeyMask(KEEP).softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5) @ v
    torch.testing.assert_close(by_sdpa, by_hand)


def test_additive_mask_equals_the_bool_mask():
    q, k, v = _qkv()
    additive = F.scaled_dot_product_attention(q, k, v, attn_mask=KeyMask(KEEP).additive(q.dtype))
    boolean = F.scaled_dot_product_attention(q, k, v, attn_mask=KeyMask(KEEP).sdpa())
    torch.testing.assert_close(additive, boolean)


def test_every_format_is_none_or_the_identity_without_a_mask():
    mask = KeyMask(None)
    logits = torch.randn(2, 3, 4, 4)
    assert mask.monai() is None and mask.sdpa() is None and mask.additive(torch.float32) is None
    assert mask.apply(logits) is logits
    assert KeyMask(torch.ones(2, 4, dtype=torch.bool)).additive(torch.float32) is None


def test_monai_and_timm_blocks_ignore_the_masked_keys_alike():
    """A masked key's value must not reach any query: changing it changes nothing in either library."""
    torch.manual_seed(0)
    monai_block = TransformerBlock(12, 24, 3, save_attn=False).eval()
    timm_block = Block(12, 3, qkv_bias=True).eval()
    x = torch.randn(2, 4, 12)
    poked = x.clone()
    poked[0, 1] += 5.0  # key 1 of image 0 is masked
    poked[1, 3] -= 5.0  # key 3 of image 1 is masked
    mask = KeyMask(KEEP)
    for run in (
        lambda t: monai_block(t, attn_mask=mask.monai()),
        lambda t: timm_block(t, attn_mask=mask.sdpa()),
    ):
        out, out_poked = run(x), run(poked)
        torch.testing.assert_close(out[KEEP], out_poked[KEEP])


def test_reduced_keys_stay_where_any_parent_is_kept():
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, 5] = True  # (1, 1): the top-left 2 x 2 footprint
    assert reduced_key_keep(keep, (4, 4), 2).tolist() == [[True, False, False, False]]


def test_key_policy_with_all_kept_is_softmax_and_blocks_dropped_keys():
    scores = torch.randn(2, 1, 5, 5)
    torch.testing.assert_close(
        KeyPolicy(torch.ones(2, 5)).softmax(scores), scores.softmax(-1), atol=1e-5, rtol=0
    )
    policy = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]]).expand(2, -1)
    weights = KeyPolicy(policy).softmax(scores)
    assert weights[:, :, [0, 1, 3]][..., [2, 4]].max() < 1e-5  # kept queries ignore dropped keys
    assert weights[:, :, 2, 2].min() > weights[:, :, 2, 4].max()  # a dropped token attends to itself


def test_key_policy_passes_a_gradient_to_dropped_keys():
    scores = torch.randn(1, 1, 4, 4)
    policy = torch.tensor([[1.0, 0.0, 1.0, 1.0]], requires_grad=True)
    KeyPolicy(policy).softmax(scores, self_attend=False)[..., 0].sum().backward()
    assert policy.grad[0, 1] != 0  # what keeping the dropped key would have changed


def test_key_policy_without_self_attention_reads_only_kept_keys_of_rectangular_scores():
    scores = torch.randn(1, 2, 6, 3)
    weights = KeyPolicy(torch.tensor([[1.0, 0.0, 1.0]])).softmax(scores, self_attend=False)
    assert weights[..., 1].max() < 1e-5
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 6))


def test_reduced_key_policy_is_the_largest_parent_weight():
    weights = torch.tensor(
        [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    reduced = reduced_key_policy(weights.view(1, 16), (4, 4), 2)
    assert reduced.tolist() == [[1.0, 0.0, 0.0, 1.0]]
