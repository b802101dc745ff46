"""Thin wrapper: `python eval.py ckpt=PATH [overrides]` (same as the `prato-eval` console script)."""

from prato_exp.cli.eval import main

if __name__ == "__main__":
    main()
