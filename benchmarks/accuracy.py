"""The accuracy study: the AFPQ paper's perplexity tables on the embedded SmolLM2.

A thin wrapper around ``afpq bench accuracy`` (library code: ``afpq_plugins/study/``)::

    .venv-legacy/bin/python benchmarks/accuracy.py --quick      # ~15 min on 2 shared cores
    .venv-legacy/bin/python benchmarks/accuracy.py              # the full tables, resumes from the quick run

Writes benchmarks/out/accuracy.json (resumable, keyed by settings), .md, .png and
_histogram.png. GPTQ and AWQ cells need the legacy venv (auto-gptq, autoawq);
``--methods rtn`` runs on either venv. See ``--help`` for the options.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from afpq_plugins.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "accuracy", *sys.argv[1:]]))
