"""Run a script (`python first_step.py PRELOAD SCRIPT ARGS...`) and record, at its first optimizer step, the seconds
since the modules in PRELOAD (comma-separated) were imported, in `$FIRST_STEP_DIR/<rank>`.

Importing torch, transformers and datasets takes seconds and jitters by more than listing 100,000 files costs on a
shared machine, the same at any data size; timed after them, start-up's growth with the data stands out of the noise.
"""

import importlib
import os
import runpy
import sys
import time

from torch.optim.optimizer import register_optimizer_step_post_hook

for module in filter(None, sys.argv[1].split(",")):
    importlib.import_module(module)
started = time.perf_counter()


def record_first_step(optimizer, args, kwargs) -> None:
    global hook
    if hook is not None:
        hook.remove()
        hook = None
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(os.environ["FIRST_STEP_DIR"], rank), "w") as handle:
            handle.write(str(time.perf_counter() - started))


hook = register_optimizer_step_post_hook(record_first_step)
script, sys.argv = sys.argv[2], sys.argv[2:]
runpy.run_path(script, run_name="__main__")
