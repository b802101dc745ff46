"""``prato-predict``: segment your own images (PNG/JPEG, NIfTI, h5) with a checkpoint and a box.

::

    prato-predict --ckpt best.ckpt --input scan.png --box 40,52,120,130 --out pred/
    prato-predict --ckpt best.ckpt --input folder/ --boxes boxes.csv --out pred/ --set q=50 --unpruned

Writes into ``--out``: ``masks/<id>.png`` (class indices; NIfTI inputs get ``<id>.nii.gz`` with the
input's affine and header, h5 inputs ``<id>.h5`` with a ``label`` dataset), ``overlays/<id>.png``
(image with box, mask, kept tokens; one per segmented slice of a volume, ``<id>_z003.png``) and
``summary.json`` (tokens kept, GFLOPs, time per image, and every failure). A file that fails is named
on stderr and in the summary, and the others go on; the exit code is then 1. Problems that concern
every file (a missing checkpoint, a malformed box file, a box-file row naming no input, an output
folder that already holds a summary) stop before any work with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from prato_exp.data.prompts import BoxError
from prato_exp.inference.io import (
    BoxEntry,
    BoxFileError,
    InputError,
    InputImage,
    boxes_for,
    check_box_ids,
    list_inputs,
    parse_box_argument,
    read_box_file,
    read_input,
    write_mask,
)

if TYPE_CHECKING:
    from prato_exp.inference.segmenter import Segmenter

SUMMARY = "summary.json"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``prato-predict``."""
    parser = argparse.ArgumentParser(
        prog="prato-predict",
        description="Segment images with a prato_exp checkpoint and a box prompt per image.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint written by prato-train (.ckpt)")
    parser.add_argument("--input", required=True, help="an image file or a folder of them (not recursive)")
    boxes = parser.add_mutually_exclusive_group(required=True)
    boxes.add_argument(
        "--box",
        help="x0,y0,x1,y1 in the image's pixels (pixel edges), used for every input; "
        "x0,y0,z0,x1,y1,z1 for a 3-D box on volumes",
    )
    boxes.add_argument("--boxes", help="CSV (image_id,slice,x0,y0,x1,y1[,z0,z1]) or JSON box file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the summary of an earlier run in --out"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pruning setting the trained pruner allows to change, e.g. --set q=50 (repeatable)",
    )
    parser.add_argument(
        "--unpruned", action="store_true", help="also run the same weights unpruned and compare"
    )
    parser.add_argument(
        "--intensity",
        choices=["auto", "minmax", "range"],
        default=None,
        help="intensity scaling (default: as in training; h5 files as stored)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed forward passes per image (median)")
    return parser


def _parse_overrides(items: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return overrides


def _fail(message: str) -> int:
    print(f"prato-predict: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``prato-predict``; the exit code: 0 ok, 1 some files failed, 2 nothing ran."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = _parse_overrides(args.overrides, parser)
    box_arg = None
    if args.box is not None:
        try:
            box_arg = parse_box_argument(args.box)
        except ValueError as err:
            parser.error(str(err))
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    out = Path(args.out)
    if (out / SUMMARY).exists() and not args.overwrite:
        return _fail(
            f"{out} already holds {SUMMARY} from an earlier run; choose a new --out or pass --overwrite"
        )
    try:
        inputs, ignored = list_inputs(args.input)
        entries = read_box_file(args.boxes) if args.boxes else None
        if entries is not None:
            check_box_ids(entries, inputs)
    except (FileNotFoundError, InputError, BoxFileError) as err:
        return _fail(str(err))

    from prato_exp.inference.segmenter import Segmenter  # torch and the model only after the cheap checks

    try:
        segmenter = Segmenter.from_checkpoint(args.ckpt, device=args.device)
        segmenter.net(**overrides)  # an override the pruner refuses stops here, before any image
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    summary = predict_files(segmenter, inputs, box_arg, entries, out, args, overrides)
    summary["ignored"] = [str(p) for p in ignored]
    from prato_exp.cli.common import environment, write_json

    summary["environment"] = environment()
    write_json(out / SUMMARY, summary)
    done, failed = len(summary["images"]), len(summary["failures"])
    print(f"prato-predict: {done} segmented, {failed} failed; summary in {out / SUMMARY}", file=sys.stderr)
    return 1 if failed else 0


def predict_files(
    segmenter: Segmenter,
    inputs: Sequence[Path],
    box_arg: np.ndarray | None,
    entries: Sequence[BoxEntry] | None,
    out: Path,
    args: argparse.Namespace,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """Segment every input, writing masks and overlays; a failing file is recorded and skipped."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "checkpoint": str(args.ckpt),
        "model": segmenter.run_config.model.get("_target_"),
        "input_size": segmenter.input_size,
        "classes": list(segmenter.class_names),
        "pruning": segmenter.pruning,
        "overrides": overrides,
        "device": str(segmenter.device),
        "boxes": f"--box {args.box}" if args.box is not None else f"--boxes {args.boxes}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "images": [],
        "failures": [],
    }
    bar = tqdm(inputs, desc="prato-predict", unit="file", file=sys.stderr, disable=None)
    for path in bar:
        bar.set_postfix_str(path.name)
        try:
            summary["images"].append(_predict_one(segmenter, path, box_arg, entries, out, args, overrides))
        except Exception as err:  # one bad file must not stop the others; it is named and recorded
            message = str(err) if path.name in str(err) else f"{path.name}: {err}"
            tqdm.write(f"prato-predict: failed: {message}", file=sys.stderr)
            summary["failures"].append({"file": str(path), "error": message, "type": type(err).__name__})
    return summary


def _box_for(image: InputImage, box_arg: np.ndarray | None, entries: Sequence[BoxEntry] | None) -> Any:
    if entries is not None:
        return boxes_for(image, entries)
    assert box_arg is not None
    if not image.is_volume:
        if box_arg.size != 4:
            raise BoxError(f"{image.path.name} is a 2-D image: --box takes x0,y0,x1,y1, not a 3-D box")
        return box_arg
    return box_arg if box_arg.size == 6 else np.repeat(box_arg[None], image.array.shape[0], axis=0)


def _predict_one(
    segmenter: Segmenter,
    path: Path,
    box_arg: np.ndarray | None,
    entries: Sequence[BoxEntry] | None,
    out: Path,
    args: argparse.Namespace,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    from prato_exp.render import overlay_panel

    image = read_input(path)
    box = _box_for(image, box_arg, entries)
    intensity = args.intensity or image.intensity
    prediction = segmenter.predict(
        image.array,
        box,
        image_id=path.name,
        unpruned=args.unpruned,
        intensity=intensity,
        repeats=args.repeats,
        **overrides,
    )
    mask_path = write_mask(prediction.mask, image, out / "masks")
    overlays = []
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    if image.is_volume:
        slices = np.flatnonzero(prediction.predicted_slices)
        for z in slices:
            kept = prediction.keep_grid[z]
            caption = f"{path.name} z={z}  kept {int(kept.sum())}/{kept.size} tokens"
            panel = overlay_panel(
                image.array[z], prediction.mask[z], prediction.keep_grid[z], prediction.box_xyxy[z], caption
            )
            overlays.append(out / "overlays" / f"{image.image_id}_z{z:03d}.png")
            panel.save(overlays[-1])
    else:
        caption = (
            f"{path.name}  kept {prediction.tokens_kept}/{prediction.tokens_total} tokens  "
            f"{prediction.time_ms:.1f} ms  {prediction.gflops:.3f} GFLOPs"
        )
        panel = overlay_panel(
            image.array, prediction.mask, prediction.keep_grid, prediction.box_xyxy, caption
        )
        overlays.append(out / "overlays" / f"{image.image_id}.png")
        panel.save(overlays[-1])
    record = {
        "file": str(path),
        "format": image.format,
        "intensity": segmenter.resolve_intensity(intensity).value,
        **prediction.summary(),
        "mask": str(mask_path),
        "overlays": [str(p) for p in overlays],
    }
    return record


if __name__ == "__main__":
    sys.exit(main())
