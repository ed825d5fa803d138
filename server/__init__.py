"""fedsim's Flower ServerApp package."""
