# Shared by scripts/demo and scripts/test (sourced, not run): find Python >= 3.11 and keep
# .venv installed from a requirements file, reinstalling only when the requirements change.

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: chatbackend needs Python >= 3.11 (set PYTHON=/path/to/python3.11 if it is not on PATH)." >&2
    return 1
}

ensure_venv() {
    # ensure_venv REQUIREMENTS_FILE: create .venv if missing; pip install when the file changed.
    local requirements=$1 python stamp digest
    if [ ! -x .venv/bin/python ]; then
        python=$(find_python)
        echo "Creating .venv with $("$python" --version 2>&1) ..."
        "$python" -m venv .venv || {
            echo "error: '$python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)." >&2
            exit 1
        }
    fi
    .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "error: .venv has $(.venv/bin/python --version 2>&1); remove it and rerun with Python >= 3.11." >&2
        exit 1
    }
    digest=$(cat requirements*.txt | .venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')
    stamp=".venv/.installed.$(basename "$requirements" .txt).$digest"
    if [ ! -f "$stamp" ]; then
        echo "Installing $requirements into .venv ..."
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
        rm -f .venv/.installed."$(basename "$requirements" .txt)".*
        touch "$stamp"
    fi
}
