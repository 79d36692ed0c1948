"""The README's config reference is generated from the dataclasses; this keeps it from drifting."""
from conftest import REPO_ROOT

from neox.config.reference import render_reference, splice_into_readme


def test_readme_config_reference_is_current():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert splice_into_readme(readme, render_reference()) == readme, "README is stale: run `make docs`"


def test_readme_names_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
