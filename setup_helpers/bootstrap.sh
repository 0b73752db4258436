#!/usr/bin/env bash
# Sets up a fresh machine for interpkernels: a virtual environment, torch,
# the build and test tools, and the extension built against that torch.
# Safe to re-run: existing pieces are kept and the build is incremental; a
# re-run with nothing changed since the last complete one (the stamp below)
# only checks that interpkernels imports.
#
#   bash setup_helpers/bootstrap.sh [--with-peers]
#   --with-peers          also install the peer SAE libraries the adapter tests
#                         run against (setup_helpers/peer-requirements.txt, ~770 MB)
#
#   INTERPKERNELS_VENV    where the environment lives (default: .venv in the repo)
#   INTERPKERNELS_TORCH   torch requirement installed when no torch imports
#                         (default torch==2.13.0: other specs pull GBs of CUDA wheels)
#   INTERPKERNELS_PYTHON  interpreter that creates the environment (default python3)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${INTERPKERNELS_VENV:-$repo/.venv}
torch_spec=${INTERPKERNELS_TORCH:-torch==2.13.0}
python=${INTERPKERNELS_PYTHON:-python3}
with_peers=0
case "${1:-}" in
  --with-peers) with_peers=1 ;;
  "") ;;
  *) echo "usage: bash setup_helpers/bootstrap.sh [--with-peers]" >&2; exit 2 ;;
esac

step() { printf '\n==> %s\n' "$*" >&2; }
fail() { printf '\nbootstrap failed: %s\n' "$*" >&2; exit 1; }

# The stamp of a complete run: a hash of everything the steps below read (the
# sources too: the install is not editable, so a changed .py needs it again),
# the torch they built against, nvcc, and whether the peers were installed.
# The hash is taken before anything is built: an edit made during the build
# then leaves a stamp that no longer matches.
stamp_file="$venv/interpkernels-bootstrap.stamp"
sources_hash=$(cd "$repo" && find pyproject.toml CMakeLists.txt csrc python setup_helpers/bootstrap.sh \
    setup_helpers/peer-requirements.txt -type f ! -name '*.so' ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
stamp() {  # stamp <torch version> <peers installed: 0|1>
  printf 'sources %s\ntorch %s\nnvcc %s\npeers %s\n' "$sources_hash" "$1" "$(command -v nvcc || echo none)" "$2"
}
if [ -f "$stamp_file" ] && installed_torch=$("$venv/bin/python" -c \
    "import interpkernels, torch; print(torch.__version__)" 2>/dev/null); then
  # A stamp with the peers also serves a run without them.
  for peers in "$with_peers" 1; do
    if [ "$(stamp "$installed_torch" "$peers")" = "$(cat "$stamp_file")" ]; then
      step "interpkernels is up to date in $venv (nothing changed since the last bootstrap)"
      exit 0
    fi
  done
fi
rm -f "$stamp_file"

if [ ! -x "$venv/bin/python" ]; then
  step "creating a virtual environment in $venv"
  "$python" -m venv "$venv" || fail "could not create a venv with $python (is the venv module installed?)"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  step "using the installed torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
else
  step "installing $torch_spec"
  "${pip[@]}" install -q "$torch_spec" numpy || fail "could not install $torch_spec"
fi

# Every later install keeps this torch: without the constraint a dependency
# asking for torch could replace it with a multi-GB CUDA build.
constraints="$venv/interpkernels-constraints.txt"
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
export PIP_CONSTRAINT="$constraints"

# triton: the Triton backend, run by the tests under its interpreter without a
# GPU (3.6's interpreter breaks with numpy >= 2.4, hence >= 3.7 here).
step "installing build, runtime and test dependencies"
"${pip[@]}" install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.26" numpy safetensors tqdm pyyaml \
  matplotlib "triton>=3.7,<3.10" "pytest>=8" "pytest-benchmark>=4" \
  || fail "could not install the build, runtime and test dependencies"

if [ "$with_peers" = 1 ]; then
  # --no-deps: the file pins the peers with everything they import; resolving
  # their declared dependencies would pull a torchvision that breaks this torch.
  step "installing the peer libraries (eai-sparsify, sae-lens, dictionary-learning)"
  "${pip[@]}" install -q --no-deps -r "$repo/setup_helpers/peer-requirements.txt" \
    || fail "could not install the peer libraries of setup_helpers/peer-requirements.txt"
fi

build_flags=()
torch_has_cuda=$("$venv/bin/python" -c "import torch; print(int(torch.version.cuda is not None))")
if [ "$torch_has_cuda" = 0 ] && command -v nvcc >/dev/null 2>&1; then
  # No CUDA torch to link against, but nvcc can still compile-check the kernels.
  build_flags+=(-Ccmake.define.INTERPKERNELS_CUDA_COMPILE_CHECK=ON)
  step "building interpkernels (CPU kernels; CUDA kernels compile-checked with $(command -v nvcc))"
else
  step "building interpkernels"
fi
"${pip[@]}" install -q --no-build-isolation --no-deps "${build_flags[@]}" "$repo" \
  || fail "the build failed; the compiler output is above"
"$venv/bin/python" -c "import interpkernels, json; print(json.dumps(interpkernels.build_info()))" \
  || fail "interpkernels was built but does not import"
stamp "$("$venv/bin/python" -c 'import torch; print(torch.__version__)')" "$with_peers" > "$stamp_file"
