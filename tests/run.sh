#!/usr/bin/env bash
# The README's test command (and what .ci/run runs): installs what the tests need when it is
# missing, then runs pytest. Extra arguments go to pytest (e.g. tests/test_kfold.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."

python=.venv/bin/python
if [ ! -x "$python" ]; then
  echo "tests/run.sh: no .venv here; run the README's first command (python3 -m venv .venv && ...) first" >&2
  exit 2
fi

# The MLflow UI test drives Debian's chromium (no browser can be downloaded on these machines).
if ! command -v chromium >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: chromium is missing and there is no apt-get to install it (Debian's chromium + chromium-driver)" >&2
    exit 2
  fi
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "tests/run.sh: installing Debian's chromium for the MLflow UI test" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi

set +e
"$python" -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then  # pytest collected no tests: that is a failure too
  echo "tests/run.sh: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
