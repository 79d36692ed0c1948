"""`deepy plan`: a training run's per-rank memory, batch arithmetic, FLOPs and step time, before it is launched."""
from neox.plan.plan import Plan, PlanOptions, build_plan
from neox.plan.report import format_plan

__all__ = ["Plan", "PlanOptions", "build_plan", "format_plan"]
