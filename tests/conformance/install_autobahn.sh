#!/usr/bin/env bash
# Install Autobahn|Testsuite (`wstest`) into .venv-autobahn/ at the repository root.
#
# wstest is Python 2.7 only (see shared/autobahn/README.md): under Python 3 its
# package installs without dependencies and fails at import. So we build a 2.7
# virtualenv with a throwaway Python 3 venv holding `virtualenv<20.22`, the last
# series that can still create 2.7 environments, and pyenv's Python 2.7.18.
#
# Idempotent: exits 0 at once when a working wstest is already installed.
# Exit codes: 0 installed (or already there), 3 no Python 2.7 found, other = failure.
# Environment: PYTHON (the Python 3 used for the builder venv, default python3),
#              PYTHON27 (an explicit Python 2.7 interpreter).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/.venv-autobahn"
WSTEST_VERSION="25.10.1"  # pins Twisted 19.10 and autobahn 0.10.9 itself
PYTHON3="${PYTHON:-python3}"

installed() {
    # A bare bin/wstest is not enough: an interrupted install leaves the script
    # behind without its dependencies, so also import the package.
    [ -x "$DEST/bin/wstest" ] && "$DEST/bin/python" -c "import autobahntestsuite" >/dev/null 2>&1
}

if installed; then
    echo "autobahn: already installed at $DEST"
    exit 0
fi

find_python27() {
    local candidates=()
    [ -n "${PYTHON27:-}" ] && candidates+=("$PYTHON27")
    if command -v pyenv >/dev/null 2>&1; then
        candidates+=("$(pyenv root)/versions/2.7.18/bin/python2.7")
    fi
    candidates+=("/root/.pyenv/versions/2.7.18/bin/python2.7")
    command -v python2.7 >/dev/null 2>&1 && candidates+=("$(command -v python2.7)")
    local py
    for py in "${candidates[@]}"; do
        if [ -x "$py" ] && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' \
            >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

if ! PY27="$(find_python27)"; then
    echo "autobahn: Python 2.7 not found (tried \$PYTHON27, \$(pyenv root)/versions/2.7.18," \
        "/root/.pyenv/versions/2.7.18, python2.7 on PATH); wstest needs it" >&2
    exit 3
fi

BUILDER="$(mktemp -d "${TMPDIR:-/tmp}/plexus-autobahn-builder.XXXXXX")"
trap 'rm -rf "$BUILDER"' EXIT

echo "autobahn: building $DEST with $PY27"
# Start from scratch: a half-built environment from an earlier failed run is not
# worth repairing.
rm -rf "$DEST"
"$PYTHON3" -m venv "$BUILDER"
"$BUILDER/bin/pip" install --quiet --disable-pip-version-check "virtualenv<20.22"
"$BUILDER/bin/virtualenv" --quiet -p "$PY27" "$DEST"
# pip for 2.7 warns loudly that 2.7 is unsupported; the warning is expected.
PYTHONWARNINGS=ignore "$DEST/bin/pip" install --quiet --disable-pip-version-check \
    --no-python-version-warning "autobahntestsuite==$WSTEST_VERSION"

if ! installed; then
    echo "autobahn: install finished but $DEST/bin/wstest does not work" >&2
    exit 1
fi
echo "autobahn: installed wstest $WSTEST_VERSION at $DEST"
