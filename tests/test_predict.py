"""Segmenting new images: the ``Segmenter`` API and the ``prato-predict`` CLI on a checkpoint trained here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from prato_exp.cli.common import build_datamodule
from prato_exp.cli.predict import main as predict_main
from prato_exp.data.phantoms import SyntheticCardiacSource
from prato_exp.data.prompts import BoxError
from prato_exp.data.transforms import resize_pair
from prato_exp.inference import Prediction, Segmenter
from prato_exp.lightning.checkpoint import build_net, load_checkpoint
from prato_exp.lightning.module import SegmentationModule

TINY_MODEL = [
    "model.img_size=96",
    "model.hidden_size=48",
    "model.mlp_dim=96",
    "model.num_heads=3",
    "model.feature_size=8",
]
GRID = 36  # (96 / 16) ** 2 tokens
KEPT_Q25 = GRID - GRID * 25 // 100  # PrATo's n - floor(q n / 100)


def tiny_checkpoint(folder: Path) -> Path:
    """A PrATo (q=25) UNETR trained for two steps on cardiac phantoms, saved by Lightning; made once."""
    path = folder / "tiny_prato.ckpt"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    cfg = compose_train(
        [
            *TINY_MODEL,
            "pruning=percentile25",
            "dataset.num_train=4",
            "dataset.num_val=1",
            "dataset.num_test=1",
            "dataset.size=96",
            "datamodule.batch_size=2",
            "augment=none",
            "logger=none",
        ]
    )
    pl.seed_everything(0)
    datamodule = build_datamodule(cfg)
    module = SegmentationModule(
        net=build_net(cfg.model, datamodule.source),
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        class_names=datamodule.source.class_names,
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.getbasetemp() / "prato_predict_ckpt")


@pytest.fixture(scope="module")
def segmenter(checkpoint) -> Segmenter:
    return Segmenter.from_checkpoint(checkpoint)


def phantom(size: int = 96, slices: int = 1) -> np.ndarray:
    """A cardiac phantom ``(D, size, size)`` float32 in [0, 1] (``(size, size)`` for one slice)."""
    source = SyntheticCardiacSource(num_train=0, num_val=0, num_test=1, size=size, slices_per_case=slices)
    image = source.load_case("phantom_cardiac_test_0000").image[0]
    return image[0] if slices == 1 else image


BOX = np.array([20.0, 24.0, 70.0, 76.0])
FAST = {"count_flops": False}  # FLOP counting costs a forward per image; only two tests check FLOPs


def test_import_prato_exp_stays_cheap_and_exports_segmenter():
    code = "import sys, prato_exp; print('torch' in sys.modules, 'prato_exp.inference' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    import prato_exp

    assert prato_exp.Segmenter is Segmenter


def test_prediction_at_original_resolution_with_kept_tokens(segmenter):
    image = np.random.default_rng(0).random((120, 200)).astype(np.float32)
    pred = segmenter.predict(image, [30, 40, 150, 100], image_id="noise")
    assert isinstance(pred, Prediction)
    assert pred.mask.shape == (120, 200) and pred.mask.dtype == np.int64
    assert pred.probabilities.shape == (4, 120, 200)
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pred.mask, pred.probabilities.argmax(0))
    assert pred.keep_grid.shape == (6, 6) and pred.scores.shape == (6, 6)
    assert pred.tokens_kept == int(pred.keep_grid.sum()) == KEPT_Q25 and pred.tokens_total == GRID
    assert pred.gflops > 0 and pred.time_ms > 0 and pred.pruned
    assert pred.summary()["tokens_kept"] == KEPT_Q25


def test_box_is_mapped_with_the_resize(segmenter):
    small = phantom(96)
    # each pixel repeated 2x down and 3x across: bilinear resizing back to 96 px gives `small` exactly
    large = np.repeat(np.repeat(small, 2, axis=0), 3, axis=1)
    ref = segmenter.predict(small, BOX, **FAST)
    pred = segmenter.predict(large, BOX * [3, 2, 3, 2], **FAST)
    np.testing.assert_allclose(pred.box_input, BOX, rtol=1e-6)
    np.testing.assert_array_equal(pred.keep_grid, ref.keep_grid)
    np.testing.assert_allclose(pred.scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert pred.mask.shape == (192, 288)
    # the scores follow the box: another box gives other scores, so the check above can fail
    moved = segmenter.predict(small, BOX + np.array([20, 10, 20, 10]), **FAST)
    assert not np.allclose(moved.scores, ref.scores)


def test_prediction_is_deterministic(segmenter):
    image = phantom(96)
    first, second = segmenter.predict(image, BOX, **FAST), segmenter.predict(image, BOX, **FAST)
    np.testing.assert_array_equal(first.mask, second.mask)
    np.testing.assert_array_equal(first.probabilities, second.probabilities)
    np.testing.assert_array_equal(first.keep_grid, second.keep_grid)
    from_torch = segmenter.predict(torch.from_numpy(image), torch.as_tensor(BOX), **FAST)  # tensors alike
    np.testing.assert_array_equal(from_torch.probabilities, first.probabilities)


def test_batch_of_images_of_different_sizes(segmenter):
    a, b = phantom(96), np.repeat(phantom(96), 2, axis=1)  # (96, 96) and (96, 192)
    preds = segmenter.predict([a, b], [BOX, BOX * [2, 1, 2, 1]], image_id=["a", "b"], **FAST)
    assert [p.mask.shape for p in preds] == [(96, 96), (96, 192)]
    assert [p.image_id for p in preds] == ["a", "b"]
    single = segmenter.predict(a, BOX, **FAST)
    np.testing.assert_array_equal(preds[0].keep_grid, single.keep_grid)
    np.testing.assert_allclose(preds[0].probabilities, single.probabilities, atol=1e-4)


def test_rgb_with_equal_channels_is_the_grayscale_image(segmenter):
    gray = (phantom(96) * 255).round().astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_array_equal(
        segmenter.predict(rgb, BOX, **FAST).mask, segmenter.predict(gray, BOX, **FAST).mask
    )


def test_large_images_are_first_downscaled_as_the_isic_source_loads_them(checkpoint):
    image = np.random.default_rng(1).random((1, 400, 300))  # (C, H, W), scaled
    direct = Segmenter.from_checkpoint(checkpoint).network_input(image)
    saved = load_checkpoint(checkpoint)
    run_config = OmegaConf.create(saved["prato_run_config"])
    run_config.dataset.max_side = 200  # an ISIC run's loader setting (ISICSource: 512 unless configured)
    staged = Segmenter(run_config, saved, str(checkpoint)).network_input(image)
    small = Image.fromarray(image[0].astype(np.float32)).resize((150, 200), Image.Resampling.BILINEAR)
    expected = resize_pair(np.array(small)[None], np.zeros((200, 150)), 96)[0]
    assert staged.shape == direct.shape == (1, 96, 96)
    torch.testing.assert_close(staged, expected)
    assert not torch.allclose(staged, direct, atol=1e-3)


def test_volume_with_one_box_per_slice_and_with_a_3d_box(segmenter):
    volume = phantom(96, slices=4)
    per_slice = segmenter.predict(volume, np.repeat(BOX[None], 4, axis=0), image_id="vol", **FAST)
    assert per_slice.mask.shape == (4, 96, 96) and per_slice.probabilities.shape == (4, 4, 96, 96)
    assert per_slice.predicted_slices.all() and per_slice.tokens_total == 4 * GRID
    assert per_slice.keep_grid.shape == (4, 6, 6)

    boxed = segmenter.predict(volume, [20, 24, 1, 70, 76, 3], image_id="vol", **FAST)
    np.testing.assert_array_equal(boxed.predicted_slices, [False, True, True, False])
    assert (boxed.mask[[0, 3]] == 0).all() and (boxed.probabilities[0, [0, 3]] == 1).all()
    assert boxed.tokens_total == 2 * GRID and boxed.tokens_kept == 2 * KEPT_Q25
    assert any("[0, 3]" in note and "background" in note for note in boxed.notes)
    # the slices inside the 3-D box are segmented as with a box per slice (intensities scaled over the volume)
    np.testing.assert_allclose(boxed.probabilities[:, 1:3], per_slice.probabilities[:, 1:3], atol=1e-4)


def test_pruning_overrides_and_the_unpruned_comparison(segmenter):
    image = phantom(96)
    assert segmenter.predict(image, BOX, q=50, **FAST).tokens_kept == GRID - GRID // 2
    pred = segmenter.predict(image, BOX, unpruned=True)
    assert pred.unpruned is not None and pred.unpruned.tokens_kept == GRID and not pred.unpruned.pruned
    assert pred.unpruned.gflops > pred.gflops
    with pytest.raises(ValueError, match=r"\['depth'\] not accepted by PrATo; allowed: .*'q'"):
        segmenter.predict(image, BOX, depth=3)
    with pytest.raises(
        ValueError, match=r"refused: pruning.budget.q \(percentile\) must lie in \(0, 100\), got 150"
    ):
        segmenter.predict(image, BOX, q=150)
    with pytest.raises(ValueError, match=r"give q \(a percentile\) or tau \(a threshold\), not both"):
        segmenter.predict(image, BOX, q=50, tau=0.3)
    fixed = segmenter.predict(image, BOX, tau=0.99, **FAST)  # a fixed threshold: at least min_keep kept
    assert 1 <= fixed.tokens_kept < GRID


BAD_BOXES = {
    "nan": ([np.nan, 10, 50, 60], "is not finite"),
    "inf": ([10, 10, np.inf, 60], "is not finite"),
    "inverted": ([60, 10, 20, 60], "has x1 < x0 or y1 < y0"),
    "outside": ([300, 300, 400, 400], "lies wholly outside the image"),
    "normalised": ([0.1, 0.2, 0.6, 0.7], "looks like 0-1 normalised coordinates"),
}


@pytest.mark.parametrize("kind", sorted(BAD_BOXES))
def test_api_rejects_a_bad_box_before_any_work(segmenter, kind, monkeypatch):
    box, message = BAD_BOXES[kind]
    for slow in ("_prepare", "_build"):  # neither the image nor a network with q=60 before the box check
        monkeypatch.setattr(segmenter, slow, lambda *a, **k: pytest.fail("slow work before the box check"))
    with pytest.raises(BoxError, match=message) as err:
        segmenter.predict(phantom(96), box, image_id="scan.png", q=60)
    assert "'scan.png'" in str(err.value)
    with pytest.raises(BoxError, match=message) as err:  # a volume's box names the slice
        segmenter.predict(phantom(96, slices=2), [BOX, box], image_id="vol.nii.gz", q=60)
    assert "'vol.nii.gz slice 1'" in str(err.value)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope\.ckpt"):
        Segmenter.from_checkpoint(tmp_path / "nope.ckpt")


@pytest.fixture(scope="module")
def input_folder(tmp_path_factory) -> Path:
    """PNG (not square), JPEG (RGB), NIfTI volume, h5 volume, an unreadable PNG and a text file."""
    folder = tmp_path_factory.mktemp("inputs")
    gray = (phantom(96) * 255).round().astype(np.uint8)
    Image.fromarray(gray).resize((144, 120)).save(folder / "case1.png")
    Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)).save(folder / "case2.jpg")
    (folder / "broken.png").write_bytes(b"this is no png")
    volume = phantom(96, slices=3)  # (D, H, W)
    affine = np.diag([1.5, 1.25, 8.0, 1.0])
    nib.save(
        nib.Nifti1Image((volume.transpose(2, 1, 0) * 900).astype(np.int16), affine), folder / "vol.nii.gz"
    )
    with h5py.File(folder / "pat.h5", "w") as f:
        f["image"] = volume[:2]
    (folder / "readme.txt").write_text("not an image")
    return folder


def test_cli_end_to_end_on_a_folder_with_a_box_file(checkpoint, input_folder, tmp_path, capsys):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "image_id,slice,x0,y0,x1,y1,z0,z1\n"
        "case1.png,,30,25,110,100,,\n"
        "case2,,20,24,70,76,,\n"
        "broken,,10,10,50,50,,\n"
        "vol,,20,24,70,76,1,3\n"
        "pat,0,20,24,70,76,,\n"
    )
    out = tmp_path / "out"
    args = ["--ckpt", str(checkpoint), "--input", str(input_folder), "--boxes", str(boxes)]
    code = predict_main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "failed: " in err and "broken.png" in err
    summary = json.loads((out / "summary.json").read_text())
    assert [f["file"] for f in summary["failures"]] == [str(input_folder / "broken.png")]
    assert "unreadable image" in summary["failures"][0]["error"]
    assert summary["ignored"] == [str(input_folder / "readme.txt")]
    images = {Path(r["file"]).name: r for r in summary["images"]}
    assert sorted(images) == ["case1.png", "case2.jpg", "pat.h5", "vol.nii.gz"]
    assert images["case1.png"]["tokens_kept"] == KEPT_Q25 and images["case1.png"]["time_ms"] > 0

    assert np.asarray(Image.open(out / "masks" / "case1.png")).shape == (120, 144)
    assert np.asarray(Image.open(out / "masks" / "case2.png")).shape == (96, 96)
    source, mask = nib.load(input_folder / "vol.nii.gz"), nib.load(out / "masks" / "vol.nii.gz")
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert mask.header.get_zooms() == source.header.get_zooms()
    voxels = np.asanyarray(mask.dataobj)
    assert voxels.dtype == np.uint8 and (voxels[..., 0] == 0).all()  # slice 0 is outside z [1, 3)
    assert images["vol.nii.gz"]["predicted_slices"] == [1, 2]
    with h5py.File(out / "masks" / "pat.h5") as f:
        assert f["label"].shape == (2, 96, 96)
    assert images["pat.h5"]["predicted_slices"] == [0] and images["pat.h5"]["intensity"] == "range"
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["case1.png", "case2.png", "pat_z000.png", "vol_z001.png", "vol_z002.png"]

    # the summary of a finished run is never overwritten silently
    again = ["--ckpt", str(checkpoint), "--input", str(input_folder / "case2.jpg"), "--box", "20,24,70,76"]
    assert predict_main([*again, "--out", str(out)]) == 2
    assert "already holds summary.json" in capsys.readouterr().err
    assert predict_main([*again, "--out", str(out), "--overwrite", "--set", "q=50"]) == 0
    rerun = json.loads((out / "summary.json").read_text())
    assert rerun["overrides"] == {"q": 50} and rerun["images"][0]["tokens_kept"] == GRID - GRID // 2


def test_cli_json_boxes_per_slice(checkpoint, input_folder, tmp_path):
    boxes = tmp_path / "boxes.json"
    rows = [{"image_id": "vol.nii.gz", "slice": z, "box": [20, 24, 70, 76]} for z in (0, 2)]
    boxes.write_text(json.dumps(rows))
    out = tmp_path / "out"
    args = ["--ckpt", str(checkpoint), "--input", str(input_folder / "vol.nii.gz"), "--boxes", str(boxes)]
    assert predict_main([*args, "--out", str(out)]) == 0
    record = json.loads((out / "summary.json").read_text())["images"][0]
    assert record["predicted_slices"] == [0, 2] and "without a box" in record["notes"][0]


@pytest.mark.parametrize("kind", sorted(BAD_BOXES))
def test_cli_rejects_a_bad_box_naming_the_image(checkpoint, input_folder, tmp_path, capsys, kind):
    box = ",".join(str(v) for v in BAD_BOXES[kind][0])
    args = ["--ckpt", str(checkpoint), "--input", str(input_folder / "case1.png"), f"--box={box}"]
    assert predict_main([*args, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert BAD_BOXES[kind][1] in err and "of image 'case1.png'" in err
    failure = json.loads((tmp_path / "out" / "summary.json").read_text())["failures"][0]
    assert failure["type"] == "BoxError" and BAD_BOXES[kind][1] in failure["error"]
    assert not (tmp_path / "out" / "masks").exists()


def test_cli_stops_before_any_work_on_errors_that_concern_every_file(
    checkpoint, input_folder, tmp_path, capsys
):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image_id,x0,y0,x1,y1\ncase1,30,25,110,100\ncase7.png,1,2,30,40\n")
    common = ["--input", str(input_folder), "--out", str(tmp_path / "out")]
    assert predict_main(["--ckpt", str(checkpoint), *common, "--boxes", str(boxes)]) == 2
    assert "'case7.png' (boxes.csv line 3)" in capsys.readouterr().err
    assert predict_main(["--ckpt", str(tmp_path / "none.ckpt"), *common, "--box", "1,2,30,40"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert predict_main(["--ckpt", str(checkpoint), *common, "--box", "1,2,30,40", "--set", "depth=3"]) == 2
    assert "allowed:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
