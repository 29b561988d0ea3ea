#!/usr/bin/env bash
# One entry point for people and CI:
#   scripts/dev.sh setup   create .venv and install the project (idempotent)
#   scripts/dev.sh up      setup, then start API + worker + Flower on the embedded default
#   scripts/dev.sh test    setup, then run the test suite
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

setup() {
    if [ ! -x .venv/bin/python ]; then
        "$PYTHON" -m venv .venv
    fi
    # Reinstall only when the dependency list changed since the last install.
    stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
    if [ ! -f "$stamp" ]; then
        .venv/bin/python -m pip install --upgrade pip >/dev/null
        .venv/bin/python -m pip install -e '.[all,test]'
        rm -f .venv/.installed-*
        touch "$stamp"
    fi
}

# The web page's browser tests drive Debian's chromium (no browser download at run time). As
# root (CI, a fresh dev machine) it is installed here when missing; elsewhere those tests are
# skipped with the command to run.
browser() {
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        # a failed install skips the browser tests rather than failing the run
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
            || echo "chromium could not be installed: the browser tests will be skipped" >&2
    fi
}

cmd=${1:-up}
shift || true
case "$cmd" in
    setup) setup ;;
    up) setup; export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}; exec .venv/bin/audio-analysis up "$@" ;;
    # The suite's files run in AUDIO_ANALYSIS_TEST_PROCESSES processes (pytest-xdist, each file
    # whole in one): most of its time is spent waiting on real workers, uvicorn and Redis, not on
    # the CPU, so on two cores two processes took the serial 17.8 minutes to 8.8 (127 % CPU).
    # Each has its own Redis database and worker (tests/_redis_db.py). 1: one process.
    test) setup; browser; export HF_HUB_OFFLINE=1
          n=${AUDIO_ANALYSIS_TEST_PROCESSES:-2}
          if [ "$n" -gt 1 ]; then set -- -n "$n" --dist loadfile "$@"; fi
          exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: $0 {setup|up|test}" >&2; exit 2 ;;
esac
