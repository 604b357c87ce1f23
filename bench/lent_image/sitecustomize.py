"""`bash bench/gpu_check.sh --dry-run` puts this folder first on PYTHONPATH, so every Python it starts
(train.py, the benches, their subprocesses) lacks what the lent GPU image lacks (the device tool's
KINDS.md): these packages are made absent, as if never installed. `None` in sys.modules makes `import`
raise ModuleNotFoundError and `importlib.util.find_spec` return None, as for a package that is not there
(transformers, for one, asks find_spec before it imports an integration).

Python imports the first `sitecustomize` on its path at start-up; one that this folder hides runs too.
"""

import importlib.machinery
import importlib.util
import os
import sys

ABSENT = ("datasets", "wandb", "deepspeed", "flash_attn")

for _name in ABSENT:
    sys.modules[_name] = None

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
if _spec is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
