"""Running circuit-tracer 0.5.0 in its own environment (setup_helpers/circuit-tracer-env.sh).

It cannot be imported here: it pins transformers <= 4.57.3 and
transformer-lens 3.2, older than the main environment's. Tests hand it files
and read back what tests/circuit_tracer_side.py (circuit-tracer alone) or
tests/circuit_tracer_dropin_side.py (both) wrote.
"""

import os
import pathlib
import subprocess
import tempfile

import pytest

import interpkernels

REPO = pathlib.Path(__file__).resolve().parent.parent
SIDE_SCRIPT = pathlib.Path(__file__).resolve().parent / "circuit_tracer_side.py"
DROPIN_SIDE_SCRIPT = pathlib.Path(__file__).resolve().parent / "circuit_tracer_dropin_side.py"


def circuit_tracer_python() -> pathlib.Path:
    """The environment's interpreter. The test command (setup_helpers/run test)
    builds it and sets INTERPKERNELS_REQUIRE_CIRCUIT_TRACER=1, so there (and in
    CI) a missing environment fails; a bare pytest elsewhere skips."""
    venv = pathlib.Path(os.environ.get("INTERPKERNELS_CIRCUIT_TRACER_VENV", REPO / ".venv-circuit-tracer"))
    python = venv / "bin" / "python"
    if not python.is_file():
        message = f"no circuit-tracer environment at {venv}: run bash setup_helpers/circuit-tracer-env.sh"
        if os.environ.get("INTERPKERNELS_REQUIRE_CIRCUIT_TRACER") == "1":
            pytest.fail(message + " (setup_helpers/run test builds it, so a missing one is a failure)")
        pytest.skip(message)
    return python


def run_circuit_tracer(*arguments: object, script: pathlib.Path = SIDE_SCRIPT,
                       with_interpkernels: bool = False) -> None:
    """`script` (circuit_tracer_side.py) with these arguments, offline, failing
    the test with its stderr. with_interpkernels: the interpkernels this
    process imported (the one under test) comes first on the script's path,
    before the installed one the environment links in."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as link_folder:
        if with_interpkernels:
            # A folder holding only a link to the package, so nothing else of this environment leaks in.
            os.symlink(pathlib.Path(interpkernels.__file__).parent, pathlib.Path(link_folder) / "interpkernels")
            environment["PYTHONPATH"] = link_folder
        result = subprocess.run([str(circuit_tracer_python()), str(script), *map(str, arguments)],
                                capture_output=True, text=True, env=environment, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"{script.name} {' '.join(map(str, arguments))} failed:\n{result.stderr[-4000:]}")
