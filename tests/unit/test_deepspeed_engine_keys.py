"""gpt-neox's DeepSpeed keys reach a real DeepSpeed engine: one spawned rank (a world of one) builds engines from
YAML and reads back what DeepSpeed made of each key, and the files its monitors and flops profiler write."""
import pytest

from neox.parallel.testing import run_distributed
from tests.unit import deepspeed_engine_checks as checks

pytestmark = pytest.mark.slow  # one spawned rank that starts DeepSpeed three times: 15-25 s


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    (result,) = run_distributed(checks.read_back, 1, str(tmp_path_factory.mktemp("ds_keys")), timeout_s=300)
    return result


def test_communication_and_precision_keys_reach_the_engine(engine):
    keys = engine["keys"]
    assert keys["communication_data_type"] == "torch.float32"  # fp32_allreduce, under bf16
    assert keys["postscale_gradients"] is False  # prescale_gradients: true
    assert keys["gradient_predivide_factor"] == 2.0
    assert keys["data_types"] == ["torch.bfloat16", "torch.float32"] and keys["bf16"] is True
    assert keys["dump_state"] is True
    assert keys["checkpoint"] == [True, True]


def test_monitors_and_profilers_run(engine):
    keys = engine["keys"]
    assert keys["flops_profiler"] == [True, 1] and keys["comms_logger"] == [True, True]
    assert keys["monitor"] == [True, "neox-keys"]
    assert "csv/run/Train_Samples_lr.csv" in engine["files"], engine["files"]  # DeepSpeed's own lr record
    assert any(f.startswith("tb/run/events.out.tfevents") for f in engine["files"]), engine["files"]
    # profile_step 1 is DeepSpeed's 0-based step count: the second step is profiled
    report = engine["flops_report"]
    assert "DeepSpeed Flops Profiler" in report and "Profile Summary at step 2" in report


def test_fp16_type_bfloat16_trains_in_bf16(engine):
    assert engine["pythia1b"] == [True, False, "torch.float32"]


def test_lion_steps_under_zero(engine):
    lion = engine["lion"]
    assert lion["optimizer"] == "Lion" and lion["untested_allowed"] is True
    assert lion["worst"] < 1e-6
