"""The one exception type for a bad configuration."""


class ConfigError(ValueError):
    """A configuration value is missing, out of range or inconsistent; the message names the key(s)."""
