"""The accuracy study: the AFPQ paper's perplexity tables on the embedded SmolLM2.

``afpq bench accuracy [--quick]`` (and ``benchmarks/accuracy.py``) quantizes the
model once per *cell* (method x format x mode x scale choice x bits x group size),
measures its perplexity on *Pride and Prejudice* (the WikiText-2 protocol of
:mod:`afpq_plugins.evaluate`) and writes

* ``PREFIX.json``: every finished cell, under the exact settings it was measured
  with (model, texts, windows, calibration, GPTQ/AWQ options). A rerun with the same
  settings skips the cells already there (resumable); other settings start their own
  section and are never mixed in a table;
* ``PREFIX.md``: the paper's table layout (one table per method and bit width, one row
  per format, one column per group size), the paper's Figure-5 comparison (two scales
  vs one scale plus a zero-point), the scale-search table (how much of the gap to fp32
  the opt-in search closes) and the list of cells where AFPQ does not win;
* ``PREFIX.png``: perplexity against group size, one line per format, one panel per
  method and bit width;
* ``PREFIX_histogram.png``: one real group of weights with the INT, one-scale FP and
  two-scale FP grid points drawn over its histogram.

Methods: ``rtn`` (round to nearest: the core's :func:`~afpq_plugins.core.quantize.fake_quantize`
on every ``nn.Linear`` but ``lm_head``, bit-identical to what
:func:`~afpq_plugins.model.quantize_model_rtn` stores, and faster to evaluate on CPU),
``gptq`` (:func:`afpq_plugins.autogptq.api.gptq_quantize`, AutoGPTQ 0.7.1) and ``awq``
(:func:`afpq_plugins.autoawq.io.awq_quantize`, AutoAWQ 0.2.9). The GPTQ and AWQ
adapters are imported only when a cell needs them, so the RTN part runs on either stack.

Caveat, repeated in every output: the embedded model's weights come from a Q4_1 GGUF
(see :mod:`afpq_plugins.data`), so "fp32" is a dequantized Q4_1 model.

Layout: :mod:`.plan` (rows, cells, settings, order), :mod:`.store` (the JSON file),
:mod:`.run` (load inputs, quantize and measure each cell), :mod:`.report` (markdown and
the files written at the end), :mod:`.plots` (the figures).
"""

from .plan import (CALIBRATED_ROWS, CALIBRATED_SEARCH_ROWS, CAVEAT, FULL, GROUP_SIZES, METHODS, QUICK, RTN_ROWS,
                   SEARCHES, Cell, Row, Settings, build_plan, cell_key)
from .plots import pick_group, plot_group_histogram, plot_results
from .report import (afpq_losses, gap_closed, markdown_report, markdown_tables, search_table, two_scale_table,
                     write_outputs)
from .run import adapters_with_search, check_groups, load_inputs, run_cell, run_study
from .store import load_results, save_results

__all__ = [
    "CAVEAT", "Cell", "Row", "RTN_ROWS", "CALIBRATED_ROWS", "CALIBRATED_SEARCH_ROWS", "Settings", "QUICK", "FULL",
    "GROUP_SIZES", "METHODS", "SEARCHES", "build_plan", "cell_key", "adapters_with_search", "check_groups",
    "load_inputs", "run_cell", "run_study", "load_results", "save_results", "gap_closed", "markdown_report",
    "markdown_tables", "two_scale_table", "search_table", "afpq_losses", "write_outputs", "plot_results",
    "plot_group_histogram", "pick_group",
]
