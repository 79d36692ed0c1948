class OptimizerError(ValueError):
    """An optimizer the config asks for cannot be built: the message names the key and what to do."""
