class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or used: the message names the path and what to do."""
