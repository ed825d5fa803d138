"""fedsim: federated learning and differential privacy simulation on Flower.

One YAML scenario describes a federation; ``fedsim run`` trains it. Every algorithm
under ``fedsim.algorithms`` is importable alone, with no Flower and no YAML.
"""

__version__ = "0.2.0"
