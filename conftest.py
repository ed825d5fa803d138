"""Set for the whole test session, doctests under fedsim/ included: Flower's environment switches
(no telemetry, no update checks, no dependency installs) and one torch thread per process."""

import os

os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                   "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})

import torch  # noqa: E402

torch.set_num_threads(1)
