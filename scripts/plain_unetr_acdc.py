"""The brief's plain-script anchor, written without the framework: a yardstick for its accuracy and speed.

    python scripts/plain_unetr_acdc.py --epochs 15 [--root ../shared/data/acdc_ssl4mis] [--model basic_unet]

MONAI UNETR (hidden 192, 128 px) or BasicUNet, batch 16, AdamW lr 3e-4, Dice-CE, flips only, on the
SSL4MIS h5 copy of ACDC: training slices from ``train_slices.list``, validation volumes from ``val.list``
scored per volume (slices predicted at 128 px, upsampled to the original grid, DSC of the stacked volume,
mean over classes then volumes). It reads the h5 files itself, shares no code with ``prato_exp``, and
prints the end-to-end training throughput (samples/s, validation included) and the mean DSC, so the
framework's ``train_samples_per_second`` and DSC can be compared with it on the same machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNETR, BasicUNet


def _resize(image: np.ndarray, label: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = F.interpolate(torch.from_numpy(image)[None, None].float(), size=(size, size), mode="bilinear")
    y = F.interpolate(
        torch.from_numpy(label.astype(np.float32))[None, None], size=(size, size), mode="nearest"
    )
    return x[0], y[0].long()


def load_training(root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All training slices resized: images ``(N, 1, S, S)``, labels ``(N, 1, S, S)``."""
    names = (root / "train_slices.list").read_text().split()
    pairs = []
    for name in names:
        with h5py.File(root / "data" / "slices" / f"{name}.h5", "r") as f:
            pairs.append(_resize(f["image"][()], f["label"][()], size))
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def load_validation(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    volumes = []
    for name in (root / "val.list").read_text().split():
        with h5py.File(root / "data" / f"{name}.h5", "r") as f:
            volumes.append((f["image"][()].astype(np.float32), f["label"][()].astype(np.int64)))
    return volumes


@torch.no_grad()
def volume_dsc(net: torch.nn.Module, volumes: list, size: int, num_classes: int = 4) -> float:
    """Mean over volumes of the mean over classes of the stacked-volume DSC (a class absent from both is
    left out)."""
    net.eval()
    scores = []
    for image, label in volumes:
        x = F.interpolate(torch.from_numpy(image)[:, None], size=(size, size), mode="bilinear")
        logits = torch.cat([net(x[i : i + 32]) for i in range(0, len(x), 32)])
        pred = F.interpolate(logits, size=label.shape[-2:], mode="bilinear").argmax(1).numpy()
        per_class = []
        for k in range(1, num_classes):
            p, t = pred == k, label == k
            if p.any() or t.any():
                per_class.append(2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
        scores.append(np.mean(per_class))
    net.train()
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("../shared/data/acdc_ssl4mis"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--model", choices=("unetr", "basic_unet"), default="unetr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    size, batch = 128, 16
    images, labels = load_training(args.root, size)
    volumes = load_validation(args.root)
    if args.model == "unetr":
        net = UNETR(
            1, 4, img_size=size, feature_size=16, hidden_size=192, mlp_dim=768, num_heads=3, spatial_dims=2
        )
    else:
        net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    started, seen, history = time.perf_counter(), 0, []
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start : start + batch]
            x, y = images[index], labels[index]
            flip_w = torch.rand(batch, generator=generator) < 0.5
            flip_h = torch.rand(batch, generator=generator) < 0.5
            x[flip_w], y[flip_w] = x[flip_w].flip(-1), y[flip_w].flip(-1)
            x[flip_h], y[flip_h] = x[flip_h].flip(-2), y[flip_h].flip(-2)
            loss = loss_fn(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += batch
        dsc = volume_dsc(net, volumes, size)
        history.append(dsc)
        elapsed = time.perf_counter() - started
        rate = seen / elapsed
        print(f"epoch {epoch + 1}/{args.epochs}: val mean DSC per volume {dsc:.4f}, {rate:.1f} samples/s")
    result = {
        "model": args.model,
        "epochs": args.epochs,
        "samples_seen": seen,
        "seconds": time.perf_counter() - started,
        "samples_per_second": seen / (time.perf_counter() - started),
        "val_mean_dsc_per_volume": history[-1],
        "history": history,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
    }
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
