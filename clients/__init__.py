"""fedsim's Flower ClientApp package."""
