"""lab: a Hydra-configured deep-learning lab. `python -m lab +experiment=NAME`."""

__version__ = "0.1.0"
