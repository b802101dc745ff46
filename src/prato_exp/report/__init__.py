"""``prato-report``: the paper's tables and figures from run folders.

- :mod:`~prato_exp.report.samples`: the figure samples a run saves (``save_report_samples``);
- :mod:`~prato_exp.report.runs`: run folders read into records (training and eval-only shapes);
- :mod:`~prato_exp.report.tables`: grouping, mean ± std over seeds, paired tests, Markdown and CSV;
- :mod:`~prato_exp.report.figures`: Figs. 3-9;
- :mod:`~prato_exp.report.cli`: the command line;
- ``paper_values.yaml``: the paper's numbers, printed beside each cell.
"""

from prato_exp.report.samples import SAMPLES_FILENAME, save_report_samples

__all__ = ["SAMPLES_FILENAME", "save_report_samples"]
