"""One answer to "is this run model-parallel" and one reading of the ZeRO stage: the config's, everywhere.

Four spellings used to disagree (pipe_parallel_size 1 was model-parallel for training, not for eval, generate or
checkpoint reading) and the ZeRO stage was read from the config's dict, the config's property or DeepSpeed's engine.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from neox.config.parallel import ParallelConfig

NEOX = Path(__file__).resolve().parents[2] / "neox"
TP_NAMES = {"model_parallel_size", "tp_size", "tp"}
PP_NAMES = {"pipe_parallel_size", "pipe_stages", "use_pipeline", "pp_size", "pp"}


@pytest.mark.parametrize("tp, pp, expected", [(1, 0, False), (2, 0, True), (1, 1, True), (1, 2, True), (2, 2, True)])
def test_model_parallel_means_tensor_shards_or_the_pipeline_engine(tp: int, pp: int, expected: bool):
    assert ParallelConfig(model_parallel_size=tp, pipe_parallel_size=pp).is_model_parallel is expected


def _name(node: ast.AST) -> str | None:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None


def _size_test(operand: ast.AST) -> str | None:
    """'tp' / 'pp' when the operand asks whether tensor / pipeline parallelism is on (`tp > 1`, `pp <= 1`,
    `topo.use_pipeline`), None otherwise (range checks such as `tp < 1` are validation, not this question)."""
    name = _name(operand)
    if isinstance(operand, ast.Compare) and len(operand.ops) == 1 and isinstance(operand.comparators[0], ast.Constant):
        ops = (ast.Gt, ast.GtE, ast.Eq, ast.LtE, ast.NotEq)
        if isinstance(operand.ops[0], ops) and operand.comparators[0].value in (0, 1):
            name = _name(operand.left)
    return "tp" if name in TP_NAMES else "pp" if name in PP_NAMES else None


def _other_spellings(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.relative_to(NEOX.parent)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.BoolOp) and {"tp", "pp"} <= {_size_test(v) for v in node.values}:
            found.append(f"{where}: decides model parallelism itself ({ast.unparse(node)})")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                node.func.attr == "zero_optimization_stage"
                or (node.func.attr == "get" and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value == "stage")):
            found.append(f"{where}: reads the ZeRO stage itself ({ast.unparse(node)})")
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "stage":
            found.append(f"{where}: reads the ZeRO stage itself ({ast.unparse(node)})")
    return found


def test_only_the_config_decides_model_parallelism_and_reads_the_zero_stage():
    # neox/config defines ParallelConfig.is_model_parallel and OptimConfig.zero_stage; everything else asks them.
    found = [hit for path in sorted(NEOX.rglob("*.py")) if "config" not in path.relative_to(NEOX).parts[:1]
             for hit in _other_spellings(path)]
    assert not found, "\n".join(found)
