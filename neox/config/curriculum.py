"""The `curriculum_learning` section: DeepSpeed's legacy curriculum-learning dict, as gpt-neox passes it.

gpt-neox hands the dict to DeepSpeed unchanged; DeepSpeed's engine then asks its CurriculumScheduler for a
difficulty before every training forward and, for `curriculum_type: seqlen`, gpt-neox cuts each batch to that many
positions (sequence-length warm-up). The shape, checked here so a typo stops the launch instead of the first step:

    curriculum_learning:
      enabled: true
      curriculum_type: seqlen
      min_difficulty: 64            # sequence length of the first steps
      max_difficulty: 2048          # reached after total_curriculum_step steps
      schedule_type: fixed_linear   # or fixed_root (+ root_degree), fixed_discrete
      schedule_config: {total_curriculum_step: 20000, difficulty_step: 8}

fixed_discrete takes `schedule_config: {difficulty: [d1, d2, ...], max_step: [s1, ...]}` (one max_step fewer than
difficulties: the last difficulty holds for every later step). DeepSpeed's `custom` schedule needs a Python function
registered on the engine, which a YAML file cannot give, so it is refused.
"""
from __future__ import annotations

from typing import Any

from neox.config.errors import ConfigError

KEY = "curriculum_learning"
SCHEDULES = ("fixed_linear", "fixed_root", "fixed_discrete")
_TOP_KEYS = ("enabled", "curriculum_type", "min_difficulty", "max_difficulty", "schedule_type", "schedule_config")
_SCHEDULE_KEYS = {
    "fixed_linear": ("total_curriculum_step", "difficulty_step"),
    "fixed_root": ("total_curriculum_step", "difficulty_step", "root_degree"),
    "fixed_discrete": ("difficulty", "max_step"),
}


def curriculum_enabled(section: dict | None) -> bool:
    return bool(section) and section.get("enabled") is True


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"'{KEY}.{where}' must be an integer >= 1, got {value!r}")
    return value


def check_curriculum(section: dict | None) -> None:
    """ConfigError naming the sub-key when the section is not a usable seqlen curriculum; None and {} mean off."""
    if not section:
        return
    unknown = sorted(set(section) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"'{KEY}' has unknown keys {unknown}; its keys are {list(_TOP_KEYS)}")
    if "enabled" not in section or not isinstance(section["enabled"], bool):
        # DeepSpeed reads a missing 'enabled' as false, while gpt-neox's pipeline path applies the schedule anyway:
        # the section has no single meaning without it.
        raise ConfigError(f"'{KEY}' needs 'enabled: true' (or false to keep the section switched off)")
    if not section["enabled"]:
        return
    kind = section.get("curriculum_type")
    if kind != "seqlen":
        raise ConfigError(
            f"'{KEY}.curriculum_type' must be 'seqlen' (sequence-length warm-up, the only type DeepSpeed's legacy "
            f"curriculum acts on), got {kind!r}")
    low = _positive_int(section.get("min_difficulty"), "min_difficulty")
    high = _positive_int(section.get("max_difficulty"), "max_difficulty")
    if low > high:
        raise ConfigError(f"'{KEY}.min_difficulty' ({low}) exceeds 'max_difficulty' ({high})")
    schedule = section.get("schedule_type")
    if schedule == "custom":
        raise ConfigError(f"'{KEY}.schedule_type' custom needs a Python schedule function registered on the engine, "
                          f"which a config cannot give; use one of {list(SCHEDULES)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"'{KEY}.schedule_type' must be one of {list(SCHEDULES)}, got {schedule!r}")
    params = section.get("schedule_config")
    if not isinstance(params, dict):
        raise ConfigError(f"'{KEY}.schedule_config' must be a mapping with {list(_SCHEDULE_KEYS[schedule])}")
    missing = [k for k in _SCHEDULE_KEYS[schedule] if k not in params]
    if missing:
        raise ConfigError(f"'{KEY}.schedule_config' of schedule_type {schedule} needs {missing}")
    if schedule == "fixed_discrete":
        difficulty, max_step = params["difficulty"], params["max_step"]
        if not isinstance(difficulty, list) or not isinstance(max_step, list) or not max_step \
                or len(difficulty) != len(max_step) + 1:
            raise ConfigError(
                f"'{KEY}.schedule_config' of fixed_discrete needs lists 'difficulty' and 'max_step' with one "
                f"max_step fewer than difficulties (the last difficulty holds afterwards), got {params!r}")
        for i, value in enumerate(difficulty):
            _positive_int(value, f"schedule_config.difficulty[{i}]")
        for i, value in enumerate(max_step):
            _positive_int(value, f"schedule_config.max_step[{i}]")
        return
    _positive_int(params["total_curriculum_step"], "schedule_config.total_curriculum_step")
    _positive_int(params["difficulty_step"], "schedule_config.difficulty_step")
    if schedule == "fixed_root":
        degree = params["root_degree"]
        if isinstance(degree, bool) or not isinstance(degree, (int, float)) or degree <= 0:
            raise ConfigError(f"'{KEY}.schedule_config.root_degree' must be a positive number, got {degree!r}")
