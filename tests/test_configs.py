"""Every choice of every config group composes and builds (a new YAML file is tested the day it lands)."""

import pytest
import torch
from conftest import compose_train, group_choices, require_acdc, require_isic
from hydra.utils import instantiate

from prato_exp.data.phantoms import SyntheticCardiacSource
from prato_exp.lightning.checkpoint import build_net
from prato_exp.pruning.base import PrunerContext, TokenPruner

REAL_DATA = {"acdc": require_acdc, "isic": require_isic}


@pytest.mark.parametrize("choice", group_choices("model"))
def test_model_choice_builds_and_runs(choice):
    cfg = compose_train([f"model={choice}", "model.img_size=32"])
    net = build_net(cfg.model, SyntheticCardiacSource(size=32))
    out = net(torch.rand(1, 1, 32, 32), torch.tensor([[4.0, 4.0, 20.0, 20.0]]))
    assert out.logits.shape == (1, 4, 32, 32)


@pytest.mark.parametrize("choice", group_choices("dataset"))
def test_dataset_choice_builds(choice):
    if choice in REAL_DATA:
        REAL_DATA[choice]()
    source = instantiate(compose_train([f"dataset={choice}"]).dataset)
    assert source.split_ids()["train"] and source.split_ids()["val"]


@pytest.mark.parametrize("choice", group_choices("pruning"))
def test_pruning_choice_builds_a_pruner(choice):
    factory = instantiate(compose_train([f"pruning={choice}"]).pruning)
    context = PrunerContext(num_classes=4, grid_hw=(8, 8), depth=12)
    assert isinstance(factory(dim=16, context=context), TokenPruner)


@pytest.mark.parametrize("choice", group_choices("prompt"))
def test_prompt_choice_builds(choice):
    prompter = instantiate(compose_train([f"prompt={choice}"]).prompt)
    assert prompter.condition == choice


@pytest.mark.parametrize("group", ["trainer", "logger", "augment"])
def test_every_choice_composes(group):
    for choice in group_choices(group):
        assert compose_train([f"{group}={choice}"]) is not None


@pytest.mark.parametrize("choice", group_choices("experiment"))
def test_experiment_composes(choice):
    assert compose_train([f"experiment={choice}"]).model._target_


@pytest.mark.parametrize("choice", group_choices("threshold"))
def test_threshold_choice_overrides_the_preset_threshold(choice):
    cfg = compose_train(["pruning=prato_naive_crop", f"threshold={choice}"])
    pruner = instantiate(cfg.pruning)(dim=16)
    assert pruner.query == "naive"
    if choice.startswith("fixed"):
        assert (pruner.budget.rule, pruner.budget.tau) == ("fixed", float(choice.removeprefix("fixed")))
    else:
        assert (pruner.budget.rule, pruner.budget.q) == ("percentile", int(choice.removeprefix("percentile")))
    assert pruner.budget.min_keep == 1


def test_users_one_word_form_selects_prato_at_q25():
    cfg = compose_train(["model=unetr", "pruning=percentile25"])
    pruner = instantiate(cfg.pruning)(dim=768)
    assert (type(pruner).__name__, pruner.budget.rule, pruner.budget.q) == ("PrATo", "percentile", 25)
    assert list(cfg.model.prune_after) == [3] and cfg.model.hidden_size == 768
