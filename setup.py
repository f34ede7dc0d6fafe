"""One build step beyond pyproject.toml: ship ``afpq_plugins-autoload.pth`` at the root of
site-packages (it makes an installed afpq-plugins register ``quant_method "afpq"`` with
transformers in any process; see ``_afpq_autoload.py``).

A wheel's root is ``build_lib``; an editable install (PEP 660, ``pip install -e .``) builds its
wheel from ``install_lib`` instead (setuptools' ``editable_wheel`` writes non-editable files
there), so the file goes to whichever of the two this build fills. Its name sorts after
setuptools' ``__editable__.*.pth``, whose import finder must be in place before our line
imports ``_afpq_autoload`` from the source tree.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "afpq_plugins-autoload.pth"
PTH_LINE = ("import os; os.environ.get('AFPQ_PLUGINS_AUTOLOAD', '1').strip().lower() not in "
            "('0', 'false', 'no', 'off') and __import__('_afpq_autoload').install()\n")


class build_py_with_pth(build_py):
    def _pth_dir(self):
        if getattr(self, "editable_mode", False):
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def run(self):
        super().run()
        target = os.path.join(self._pth_dir(), PTH_NAME)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + [os.path.join(self.build_lib, PTH_NAME)]


setup(cmdclass={"build_py": build_py_with_pth})
