"""The optimizer and its parameter groups, built the same way by every engine (neox/train/engine.py,
neox/parallel/engine.py) and by the offline checkpoint readers that need the param-group order."""
from neox.optim.errors import OptimizerError
from neox.optim.optimizer import OPTIMIZER_TYPES, build_optimizer, configured_optimizer, param_groups, set_lr

__all__ = ["OPTIMIZER_TYPES", "OptimizerError", "build_optimizer", "configured_optimizer", "param_groups", "set_lr"]
