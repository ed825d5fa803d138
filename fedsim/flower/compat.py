"""Every private Flower API fedsim touches, in one place, checked against the pinned version.

Flower 1.41 gives no public way to run a ServerApp outside its own runtimes; an in-process
Grid needs the task identity that ``Message()`` reads and an empty ``Run``. A contract test
(`tests/unit/flower/test_compat.py`) fails loudly if a Flower upgrade moves them.
"""

from __future__ import annotations

import flwr

from fedsim.errors import RunError

SUPPORTED = "1.41."


def check_version() -> None:
    """Refuse to run on a Flower minor version whose internals were not verified."""
    if not flwr.__version__.startswith(SUPPORTED):
        raise RunError(f"fedsim needs flwr {SUPPORTED}* (found {flwr.__version__}); "
                           "install with: pip install -c constraints.txt -e .")


def set_server_identity(run_id: int) -> None:
    """Make this process the SuperLink side of run ``run_id`` (``Message()`` reads this)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, SUPERLINK_NODE_ID


def empty_run(run_id: int):
    """An empty ``flwr.supercore.run.Run`` (legacy workflows read ``grid.run.run_id``)."""
    from flwr.supercore.run import Run

    return Run.create_empty(run_id=run_id)
