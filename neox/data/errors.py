"""The one exception type of the dataset/loader layer (bad paths, weights, splits, batch sizes)."""


class DataError(ValueError):
    """Training data cannot be built as configured; the message names the path or key to fix."""
