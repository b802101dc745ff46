"""Thin wrapper: `python train.py [hydra overrides]` (same as the `prato-train` console script)."""

from prato_exp.cli.train import main

if __name__ == "__main__":
    main()
