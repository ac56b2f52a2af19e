"""Several processes of one training stage (``accelerate launch``, ``torchrun``): who writes the files.

Under a multi-process launch every process runs the whole stage and the Trainer keeps them in
step (one shard of each batch each, gradients averaged). The run directory is written by the main
process (rank 0) alone: ``records.write_json``, ``records.JsonlAppender.append`` and
``models.save_model_dir`` write nothing in the other processes (``save_model_dir`` then waits until
the main process has saved, so every process can read the model back). Work whose results are
written and read back (the helpfulness answers SFT generates) runs in the main process first
(:func:`main_first`); the others then find it done on disk. Outside such a launch (``WORLD_SIZE``
unset or 1) all of this does nothing.
"""

from __future__ import annotations

import contextlib
import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def main_first(cpu: bool):
    """Run the block in the main process, then in the others (which wait for it).

    ``cpu`` must be what the stage's Trainer gets as ``use_cpu``: this may be the first use of
    accelerate's process state, which is set up once per process (on CPU, ``cpu=True`` is what
    makes it a multi-process state at all).
    """
    if world_size() <= 1:
        yield
        return
    from accelerate import PartialState

    with PartialState(cpu=cpu).main_process_first():
        yield


def wait_for_everyone() -> None:
    """A barrier over the processes (the Trainer has set up their state by the time it is called)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
