"""Images keeping different token counts: ``group`` runs each count on its own, with no padding waste."""

from functools import partial

import pytest
import torch

from prato_exp.metrics.efficiency import count_flops
from prato_exp.models.transunet import PrunableTransUNet
from prato_exp.models.unetr import PrunableUNETR
from prato_exp.pruning.budget import TokenBudget
from prato_exp.pruning.prato import PrATo
from prato_exp.tokens.blocks import run_by_count

SIZE = 64  # 4 x 4 tokens
FIXED = partial(PrATo, budget=TokenBudget("fixed", tau=0.5))


def test_run_by_count_runs_each_count_on_exactly_its_tokens():
    tokens = torch.ones(3, 4, 2)
    valid = torch.tensor([[True, True, False, False], [True] * 4, [True, True, False, False]])
    seen = []

    def run(x):
        seen.append(tuple(x.shape))
        return x * x.shape[1]

    out = run_by_count(run, tokens, valid)
    assert sorted(seen) == [(1, 4, 2), (2, 2, 2)]
    assert out[:, :, 0].tolist() == [[2, 2, 0, 0], [4, 4, 4, 4], [2, 2, 0, 0]]


def _unetr(unequal_counts: str) -> PrunableUNETR:
    torch.manual_seed(0)
    kwargs = {"pruner": FIXED, "prune_after": (3, 6), "unequal_counts": unequal_counts}
    return PrunableUNETR(1, 3, img_size=SIZE, hidden_size=48, mlp_dim=96, num_heads=3, **kwargs).eval()


def _images(b: int = 4):
    torch.manual_seed(3)
    boxes = torch.tensor([[8.0, 8.0, 40.0, 30.0], [20.0, 16.0, 60.0, 64.0], [0, 0, 64, 64], [30, 30, 40, 40]])
    return torch.rand(b, 1, SIZE, SIZE), boxes[:b]


def test_grouped_blocks_give_the_padded_batchs_logits():
    image, box = _images()
    padded, grouped = _unetr("pad"), _unetr("group")
    with torch.no_grad():
        want, got = padded(image, box), grouped(image, box)
    counts = want.trace.keep_grids[0].sum(dim=1)
    assert len(set(counts.tolist())) > 1, "the test needs images keeping different counts"
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-4)


def test_grouped_flops_are_the_sum_over_images():
    image, box = _images()
    net = _unetr("group")
    part = net.pruned_part()
    batch = count_flops(net, image, box).flops_under(part)
    alone = sum(count_flops(net, image[i : i + 1], box[i : i + 1]).flops_under(part) for i in range(4))
    padded = count_flops(_unetr("pad"), image, box).flops_under(part)
    assert batch == alone < padded


def test_an_unknown_choice_is_refused_by_name():
    with pytest.raises(ValueError, match=r"model\.unequal_counts must be one of \('pad', 'group'\)"):
        PrunableTransUNet(1, 3, img_size=SIZE, unequal_counts="bucket")
