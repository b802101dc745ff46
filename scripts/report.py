"""Every table and figure of the paper from run folders; the same as the console script ``prato-report``.

Example::

    python scripts/report.py outputs/multirun/2025-01-01_12-00-00 --out docs/results/report
"""

import sys

from prato_exp.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
