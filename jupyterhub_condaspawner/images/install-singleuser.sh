#!/bin/sh
# Installs the single-user server into /opt/conda; both base images run it at build
# time, as root: install-singleuser.sh REQUIREMENTS_FILE
set -eu
python=/opt/conda/bin/python
"$python" -m pip install --no-cache-dir --disable-pip-version-check -r "$1"
# jupyter_events imports jsonschema, whose optional rfc3987-syntax format checker
# compiles about 40 Lark grammars at import: 1.5-2 CPU-seconds on every server start,
# most of the server's boot, for the "iri" formats nothing in the server checks.
# jsonschema works without it (the format is then not checked).
"$python" -m pip uninstall --yes --quiet rfc3987-syntax
# Servers run as jovyan, who cannot write __pycache__ under /opt/conda: any module
# without its .pyc (the bench's Python ships none) is compiled again on every start.
# A few test files in the standard library are not valid Python 3: ignore their errors.
"$python" -m compileall -q -j 0 /opt/conda/lib > /dev/null || true
