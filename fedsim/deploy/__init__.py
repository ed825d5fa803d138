"""Multi-machine deployment helpers: TLS certificates, SuperNode keys, launch commands.

Nothing here imports flwr: the helpers generate files and command text for the stock
``flower-superlink`` / ``flower-supernode`` / ``flwr`` executables. See ``deploy/README.md``.
"""

from fedsim.deploy.certs import make_certs, make_node_key
from fedsim.deploy.commands import deploy_commands

__all__ = ["deploy_commands", "make_certs", "make_node_key"]
