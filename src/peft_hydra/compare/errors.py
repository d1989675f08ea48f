"""The one error of the comparison harness for bad input."""


class ConfigError(ValueError):
    """A comparison config, its data, its methods or its model cannot be used; the message names the problem and
    the fix. ``peft-hydra compare | report | analyze`` print it and exit with status 2."""
