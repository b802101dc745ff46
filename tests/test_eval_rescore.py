"""eval.py re-scores a checkpoint under another q, tau, k or prompt where no learned part depends on it,
refuses clearly where one does, and refuses keys it does not use."""

import json

import pytest
from conftest import compose_eval, compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prato_exp.cli.eval import evaluate, rescoring_config
from prato_exp.cli.train import train
from prato_exp.lightning.checkpoint import upgrade_run_config
from prato_exp.pruning.budget import TokenBudget


def _run_cfg(pruning: str):
    """A checkpoint's stored run config: resolved, as SegmentationModule saves it."""
    return OmegaConf.create(OmegaConf.to_container(compose_train([f"pruning={pruning}"]), resolve=True))


def test_a_percentile_preset_changes_only_q_of_the_trained_prato():
    cfg = rescoring_config(compose_eval(["ckpt=x", "pruning=percentile50"]), _run_cfg("percentile25"))
    assert (cfg.pruning.budget.q, cfg.model.pruner.budget.q) == (50, 50)
    assert cfg.pruning.k == _run_cfg("percentile25").pruning.k


def test_a_fixed_threshold_replaces_the_percentile_of_the_trained_prato():
    cfg = rescoring_config(compose_eval(["ckpt=x", "threshold=fixed0.3"]), _run_cfg("percentile25"))
    budget = cfg.model.pruner.budget
    assert (budget.rule, budget.tau, budget.q, budget.min_keep) == ("fixed", 0.3, None, 1)


def test_one_budget_key_changes_only_that_key():
    cfg = rescoring_config(compose_eval(["ckpt=x", "+pruning.budget.q=40"]), _run_cfg("percentile25"))
    budget = instantiate(cfg.model.pruner.budget)
    assert (budget.rule, budget.q, budget.tau) == ("percentile", 40, None)


def test_an_older_checkpoints_flat_budget_keys_are_read_as_its_budget():
    stored = OmegaConf.to_container(_run_cfg("random"))
    for node in (stored["pruning"], stored["model"]["pruner"]):
        del node["budget"]
        node |= {"threshold": "percentile", "q": 50, "tau": None, "min_keep": 1}
    upgrade_run_config(stored)
    cfg = rescoring_config(compose_eval(["ckpt=x"]), OmegaConf.create(stored))
    assert instantiate(cfg.model.pruner)(dim=8).budget == TokenBudget(q=50)


def test_roialign_k_can_change_at_evaluation():
    cfg = rescoring_config(compose_eval(["ckpt=x", "+pruning.k=7"]), _run_cfg("percentile25"))
    assert cfg.model.pruner.k == 7


def test_a_pruner_with_a_learned_part_refuses_a_new_budget():
    with pytest.raises(ValueError, match="DynamicViTPruner has no re-scorable key"):
        rescoring_config(compose_eval(["ckpt=x", "threshold=percentile50"]), _run_cfg("dynamicvit"))


def test_another_pruner_is_refused():
    with pytest.raises(ValueError, match="not under another pruner"):
        rescoring_config(compose_eval(["ckpt=x", "pruning=random"]), _run_cfg("percentile25"))


def test_a_key_prato_cannot_change_names_the_keys_that_can():
    with pytest.raises(ValueError, match=r"pruning.query='naive'.*re-scorable keys of PrATo"):
        rescoring_config(compose_eval(["ckpt=x", "+pruning.query=naive"]), _run_cfg("percentile25"))


def test_a_key_eval_does_not_use_is_an_error():
    with pytest.raises(ValueError, match=r"eval.py does not use \['model'\]"):
        rescoring_config(compose_eval(["ckpt=x", "+model.hidden_size=384"]), _run_cfg("percentile25"))


DATA = ["dataset=synthetic_cardiac", "dataset.size=48", "dataset.num_train=8", "dataset.num_val=2"]
DATA += ["dataset.num_test=0", "num_overlays=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A PrATo (q = 25) trained one epoch on phantoms."""
    tiny = ["model.img_size=32", "datamodule.batch_size=4", "dataset.size=48", "dataset.num_train=8"]
    tiny += [
        "dataset.num_val=2",
        "dataset.num_test=0",
        "efficiency.flop_images=1",
        "efficiency.latency_repeats=2",
    ]
    tiny += ["logger=none", "trainer.max_epochs=1"]
    return train(compose_train([*tiny, "pruning=percentile25"]), tmp_path_factory.mktemp("run"))


def test_rescoring_a_trained_checkpoint_at_q50_prunes_twice_as_many_tokens(trained, tmp_path):
    ckpt = trained["last_checkpoint"]
    at_50 = evaluate(compose_eval([f"ckpt={ckpt}", *DATA, "pruning=percentile50"]), tmp_path / "q50")
    at_25 = evaluate(compose_eval([f"ckpt={ckpt}", *DATA]), tmp_path / "q25")
    assert at_25["metrics"]["val/sparsity"] == pytest.approx(0.25, abs=0.03)
    assert at_50["metrics"]["val/sparsity"] == pytest.approx(0.50, abs=0.03)
    stored = json.loads((tmp_path / "q50" / "metrics.json").read_text())
    assert stored["metrics"]["val/sparsity"] == at_50["metrics"]["val/sparsity"]


def test_a_rescoring_run_records_what_its_weights_were_trained_on(trained, tmp_path):
    results = evaluate(compose_eval([f"ckpt={trained['last_checkpoint']}", *DATA]), tmp_path / "eval")
    assert results["train_samples_seen"] == trained["train_samples_seen"] == 8  # 2 steps of 4, 1 epoch


@pytest.mark.parametrize(("choice", "expected"), [("dense", None), ("1", 1), ("0", 0)])
def test_the_decoder_window_can_change_at_evaluation(choice, expected):
    trained = _run_cfg("percentile25")
    cfg = rescoring_config(compose_eval(["ckpt=x", f"decoder_window={choice}"]), trained)
    assert cfg.model.decoder_window == expected


def test_by_default_the_decoder_window_is_the_checkpoints():
    trained = _run_cfg("percentile25")
    trained.model.decoder_window = 2
    assert rescoring_config(compose_eval(["ckpt=x"]), trained).model.decoder_window == 2


def test_a_bad_decoder_window_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"decoder_window must be checkpoint, dense or a margin >= 0.*-1"):
        rescoring_config(compose_eval(["ckpt=x", "decoder_window=-1"]), _run_cfg("percentile25"))


def test_the_window_batching_can_change_at_evaluation_and_defaults_to_the_checkpoints():
    trained = _run_cfg("percentile25")
    assert rescoring_config(compose_eval(["ckpt=x"]), trained).model.decoder_window_batch == "shared"
    cfg = rescoring_config(compose_eval(["ckpt=x", "decoder_window_batch=by_size"]), trained)
    assert cfg.model.decoder_window_batch == "by_size"


def test_a_bad_window_batching_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"decoder_window_batch must be one of .*'by_size'.*'each'"):
        rescoring_config(compose_eval(["ckpt=x", "decoder_window_batch=each"]), _run_cfg("percentile25"))
