"""The single-user server's wheels for the offline base image, fetched beside mmdebstrap.

The base image's docker build pip-installs the server (``images/install-singleuser.sh``).
Fetching its ~100 wheels there put PyPI's latency on the set-up's critical path, after
mmdebstrap and the rootfs import; fetched first, in parallel with them, the build installs
them from this folder, served on loopback (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``). They are
fetched by the pyenv CPython 3.9 the bench's ``python`` package is made from, since pip
evaluates the requirements' markers for the interpreter it runs in, whatever
``--python-version`` says; and by the channel's pip, run from its wheel: that CPython's own
pip (23.0) spent minutes in its resolver on these pins.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jupyterhub_condaspawner.baseimage import SINGLEUSER_REQUIREMENTS

from .devchannel import (
    TARGET_PYTHON,
    WHEEL_PINS,
    WHEEL_PLATFORMS,
    download_wheels,
    exclusive_lock,
    find_shared_python,
    python_interpreter,
)
from .phases import PhaseLog

FOLDER = "wheels-singleuser"  # under the bench folder
STAMP = ".requirements.sha256"


def download_singleuser_wheels(bench_dir: Path) -> tuple[Path, bool]:
    """The folder of wheels that install the single-user pins for Python 3.9 on linux x86_64,
    and whether they were there already (kept by the pins file's digest). Raises on failure:
    the caller's build then fetches them itself."""
    folder = Path(bench_dir) / FOLDER
    digest = hashlib.sha256(SINGLEUSER_REQUIREMENTS.read_bytes()).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder / ".lock"):
        stamp = folder / STAMP
        if stamp.exists() and stamp.read_text() == digest:
            return folder, True
        for wheel in folder.glob("*.whl"):
            wheel.unlink()
        python = python_interpreter(find_shared_python())
        pip_pin = next(pin for pin in WHEEL_PINS if pin.startswith("pip=="))
        (pip_wheel,) = download_wheels([pip_pin], folder / ".pip", lambda message: None, PhaseLog())
        platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
        command = [
            str(python), str(pip_wheel / "pip"), "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
            "--python-version", TARGET_PYTHON, "--implementation", "cp", "--abi", f"cp{TARGET_PYTHON.replace('.', '')}",
            *platforms, "--dest", str(folder), "-r", str(SINGLEUSER_REQUIREMENTS),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pip download failed: {' '.join(result.stderr.split()[-40:])}")
        stamp.write_text(digest)
    return folder, False


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


@contextlib.contextmanager
def served(folder: Path) -> Iterator[str]:
    """``folder`` served over HTTP on 127.0.0.1 while the block runs: its URL, for pip's
    ``--find-links`` (the directory listing links every wheel)."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="base-wheels", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
