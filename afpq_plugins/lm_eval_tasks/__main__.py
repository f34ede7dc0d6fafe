"""``python -m afpq_plugins.lm_eval_tasks``: print the folder to pass to ``lm_eval --include_path``."""

import os

print(os.path.dirname(os.path.abspath(__file__)))
