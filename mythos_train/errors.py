"""ConfigError, in a module of its own: parallel/config.py raises it and mythos_train/config.py imports that."""


class ConfigError(ValueError):
    """A configuration problem, raised before any distributed state exists."""
