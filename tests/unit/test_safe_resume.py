"""Resuming never runs code from a checkpoint: a real DeepSpeed engine at ZeRO 0-3, bf16 and as a pipeline resumes
exactly through engine_state.load with every file read weights-only, and a crafted pickle in its model states,
optimizer partition or pipeline layer file is refused (resume, consolidate, HF export) where DeepSpeed's default
load would run it."""
import pytest

from neox.parallel.testing import run_distributed
from tests.unit import safe_resume_checks as checks


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    (result,) = run_distributed(checks.check_layouts, 1, str(tmp_path_factory.mktemp("safe_resume")), timeout_s=300)
    return result


@pytest.mark.parametrize("name", list(checks.LAYOUTS))
def test_resume_reads_every_deepspeed_file_weights_only(layouts, name):
    record = layouts[name]
    assert checks.LAYOUTS[name][1] in record["files"]
    assert record["client_state"]["iteration"] == 2
    assert record["resumed"] == record["expected"]  # weights and optimizer state both came back
    assert record["consolidated"]


@pytest.mark.parametrize("name", list(checks.LAYOUTS))
def test_a_crafted_pickle_is_refused_and_never_runs(layouts, name):
    record = layouts[name]
    read_by_consolidate = checks.LAYOUTS[name][2]
    for key in ("refused", "consolidate_refused", "export_refused"):
        if key != "refused" and not read_by_consolidate:
            assert record[key].startswith("not refused"), record[key]
            continue
        assert f"refusing to load {record['target']}" in record[key], (key, record[key])
        assert "posix.system" in record[key] and "could run code" in record[key]
    assert record["marker_after_safe_loads"] is False
    assert record["marker_after_deepspeed_load"] is True  # the old path: this test would have caught it
