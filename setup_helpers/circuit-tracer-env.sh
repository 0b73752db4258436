#!/usr/bin/env bash
# A separate environment for circuit-tracer 0.5.0, the peer that
# interpkernels.graphs is checked against (tests/graphs). It cannot share the
# main environment: it pins transformers <= 4.57.3 and transformer-lens 3.2,
# older than the peer set's (setup_helpers/peer-requirements.txt).
#
#   bash setup_helpers/circuit-tracer-env.sh
#
#   INTERPKERNELS_VENV                 the main environment, already bootstrapped
#                                      (default: .venv in the repo)
#   INTERPKERNELS_CIRCUIT_TRACER_VENV  where this one lives (default: .venv-circuit-tracer)
#   INTERPKERNELS_PYTHON               interpreter that creates it (default python3)
#
# Installed: setup_helpers/circuit-tracer-requirements.txt (circuit-tracer and
# everything it imports, pinned) against torch==2.13.0, the local CPU wheel
# (any other torch spec pulls GBs of CUDA wheels). interpkernels is not built a
# second time: the main environment's installed package is linked in (a .pth
# naming a folder that holds only a link to it), which is sound because both
# environments run the same interpreter and the same torch, checked below
# against the torch the extension was built against. A later bootstrap that
# rebuilds interpkernels is seen here at once.
#
# Safe to re-run: a run with nothing changed since the last complete one (the
# stamp below) only checks that circuit_tracer and interpkernels import.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
main_venv=${INTERPKERNELS_VENV:-$repo/.venv}
venv=${INTERPKERNELS_CIRCUIT_TRACER_VENV:-$repo/.venv-circuit-tracer}
python=${INTERPKERNELS_PYTHON:-python3}
requirements="$repo/setup_helpers/circuit-tracer-requirements.txt"

step() { printf '\n==> %s\n' "$*" >&2; }
fail() { printf '\ncircuit-tracer-env failed: %s\n' "$*" >&2; exit 1; }

# Where the main environment's interpkernels lives (its installed copy, not the
# source tree: the compiled extension is only there).
main_package=$("$main_venv/bin/python" -c \
    "import interpkernels, os; print(os.path.dirname(interpkernels.__file__))" 2>/dev/null) \
  || fail "interpkernels does not import in $main_venv: run setup_helpers/bootstrap.sh first"

# The environment works when circuit_tracer and the linked interpkernels import
# together, on the torch interpkernels was built against.
check_env() {
  "$venv/bin/python" - <<'EOF'
import circuit_tracer, interpkernels, torch
built_against = interpkernels.build_info()["torch_built_against"]
if built_against.split("+")[0] != torch.__version__.split("+")[0]:
    raise SystemExit(f"interpkernels was built against torch {built_against}, this environment runs {torch.__version__}")
EOF
}

stamp_file="$venv/interpkernels-circuit-tracer.stamp"
stamp=$(cat "${BASH_SOURCE[0]}" "$requirements" | sha256sum | cut -d' ' -f1; echo "$main_package")
if [ -f "$stamp_file" ] && [ "$stamp" = "$(cat "$stamp_file")" ] && check_env 2>/dev/null; then
  step "circuit-tracer is up to date in $venv"
  exit 0
fi
rm -f "$stamp_file"

if [ ! -x "$venv/bin/python" ]; then
  step "creating a virtual environment in $venv"
  "$python" -m venv "$venv" || fail "could not create a venv with $python"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# The main environment's torch, exactly: the linked extension needs it, and
# the constraint keeps circuit-tracer's `torch>=2.0.0` from resolving to a CUDA build.
constraints="$venv/interpkernels-constraints.txt"
"$main_venv/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
export PIP_CONSTRAINT="$constraints"

step "installing $(cat "$constraints") and circuit-tracer (setup_helpers/circuit-tracer-requirements.txt)"
"${pip[@]}" install -q --no-deps -r "$requirements" "$(cat "$constraints")" \
  || fail "could not install setup_helpers/circuit-tracer-requirements.txt"

step "linking interpkernels from $main_package"
site_packages=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
link_folder="$venv/interpkernels-link"
mkdir -p "$link_folder"
ln -sfn "$main_package" "$link_folder/interpkernels"
echo "$link_folder" > "$site_packages/interpkernels-link.pth"

check_env || fail "circuit_tracer and interpkernels do not import together in $venv"
echo "$stamp" > "$stamp_file"
