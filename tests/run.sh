#!/usr/bin/env bash
# The one test command (README.md): installs what the tests need into .venv-tests and runs them.
#   bash tests/run.sh [test paths] [extra pytest args]
# Pure-torch tier always; the ComfyUI tier too when ComfyUI is found at $COMFYUI_PATH or ~/comfy/ComfyUI.
# SINE_REQUIRE_COMFYUI_TIER=1 (set by .ci/run): a ComfyUI tier that cannot run or did not run fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SINE_TEST_VENV:-.venv-tests}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch: keep any installed build; otherwise an exact pin (on CPU machines of this project it resolves to the
# local CPU wheel; set SINE_TORCH to another spec, e.g. a CPU index URL elsewhere). Never a range.
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install ${SINE_TORCH:-torch==2.13.0}
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"

pip_install -c "$constraints" -r requirements.txt -r tests/requirements-test.txt
comfy=$("$PY" -c "import sys; sys.path.insert(0, 'tests'); from comfyui_harness import find_comfyui; print(find_comfyui() or '')")
if [ -n "$comfy" ]; then
  # ComfyUI's own requirements, whichever release this is (newer ones add comfy-kitchen, comfy-aimdo, ...), less
  # the packages that pull a CUDA torch of several GB (import-only stand-ins in tools/import_standins serve them)
  # and the OpenGL ones for nodes the tests never run; plus what headless use needs (tests/requirements-comfyui.txt).
  echo "ComfyUI found at $comfy: installing its dependencies (less the torch family) and tests/requirements-comfyui.txt"
  comfy_reqs=$(mktemp)
  trap 'rm -f "$constraints" "$comfy_reqs"' EXIT
  grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio|kornia|spandrel|comfy-angle|pyopengl)[[:space:]]*([<>=~!;[]|$)' \
    "$comfy/requirements.txt" > "$comfy_reqs" || true
  pip_install -c "$constraints" -r "$comfy_reqs" -r tests/requirements-comfyui.txt
fi

# Test paths among the arguments replace the default `tests` (e.g. `bash tests/run.sh tests/comfyui/test_sdxl.py`).
targets=(tests)
for arg in "$@"; do
  [[ "$arg" != -* && -e "${arg%%::*}" ]] && targets=()
done
set +e
"$PY" -m pytest "${targets[@]}" -q -p no:cacheprovider -rfE "$@"
rc=$?
set -e
[ $rc -eq 5 ] && { echo "no tests collected"; rc=0; }
exit $rc
