"""Flower ServerApp entry point (``server.app:app``): the scenario in the run config -> fedsim's server loop."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.flower.runner import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by ``context.run_config``."""
    serve(grid, context)
