"""The rules for one pip line that ``packaging`` does not check.

No options but ``--hash`` (pip checks the download against it), no URLs, version-control
references or paths, and no PyTorch index or its local versions (``+cu118``), with the
conda way to get PyTorch instead.
"""

from __future__ import annotations

import hashlib
import re

from packaging.requirements import Requirement

_VCS_PREFIXES = ("git+", "hg+", "svn+", "bzr+")
# git's ssh form, `git@github.com:org/tool.git`: a repository, not a path.
_SCP_LIKE = re.compile(r"[\w.-]+@[\w.-]+:")
# pip's hash option on a requirement line, as `pip-compile --generate-hashes` writes it.
_PIP_HASH = re.compile(r"\s+--hash[=\s]\s*(\S+)")
_PIP_HASH_VALUE = re.compile(r"(sha256|sha384|sha512):([0-9a-fA-F]+)\Z")
# PyTorch's own wheel index and the local version labels only it serves (`2.0.1+cu118`).
_PYTORCH_INDEX = re.compile(r"download\.pytorch\.org/whl/(?:nightly/)?(cu\d+|cpu|rocm[\d.]+)?")
_PYTORCH_LABEL = re.compile(r"cu\d{3,}|cpu|rocm[\d.]+\Z")
PYTORCH_CHANNELS_HINT = ("install PyTorch with conda instead: channels pytorch and nvidia, "
                         "dependencies pytorch{cuda}")

# A distribution's file name: pip installs such a requirement line from the local file.
_ARCHIVE_NAME = re.compile(r"\.(whl|zip|tar|tgz|tar\.gz|tar\.bz2|tar\.xz)(\s|\[|$)", re.IGNORECASE)
# A version operator with no version after it. Whether packaging accepts `requests===`
# (arbitrary equality with an empty string) depends on its release: refuse it here.
EMPTY_OPERATOR = re.compile(r"(===|==|!=|~=|<=|>=|<|>)\s*(?=,|\)|$)")


def policy_refusal(text: str) -> str | None:
    """Why a pip line is refused before parsing, or None: options, URLs, VCS and paths."""
    requirement_part = text.split(";", 1)[0]
    pytorch = _PYTORCH_INDEX.search(requirement_part)
    if pytorch and re.search(r"(^|\s)-", requirement_part):
        cuda = pytorch_cuda(pytorch.group(1) or "")
        return "PyTorch's own index cannot be used here; " + PYTORCH_CHANNELS_HINT.format(cuda=cuda)
    if re.search(r"\s--hash\b", requirement_part):
        return "--hash must be sha256:, sha384: or sha512: and the full hex digest, after the requirement"
    # pip's requirements file splits a line at its first " -", even inside a marker's quotes.
    option = re.search(r"(^|\s)(-\S*)", text)
    if option:
        before = text[:option.start(2)].strip()
        if before and not re.search(r"[;\s]", before):  # `dipy --only-binary dipy`: the package is right there
            return f"pip options ({option.group(2)}) are not allowed: list {before!r} alone"
        return "pip options (-e, -r, --index-url, --extra-index-url, --find-links, ...) are not allowed"
    if "://" in requirement_part or requirement_part.startswith(_VCS_PREFIXES) or _SCP_LIKE.match(requirement_part):
        return "URLs and version-control references are not allowed; name a package from the index"
    if requirement_part.startswith((".", "/", "~")) or "/" in requirement_part or "\\" in requirement_part:
        return "local paths are not allowed; name a package from the index"
    if _ARCHIVE_NAME.search(requirement_part.strip()):  # pip reads `foo-1.0-py3-none-any.whl` as a file here
        return "local files are not allowed; name the package from the index (such as 'numpy==1.26.4')"
    return None


def split_hashes(text: str) -> tuple[str, list[str]]:
    """A pip line without its ``--hash=ALGORITHM:HEX`` options, and those hashes (sorted).

    The one pip option allowed: pip checks the download against it. A malformed hash is
    left in the text, where the option check refuses it.
    """
    hashes = []
    for match in reversed(list(_PIP_HASH.finditer(text))):
        value = _PIP_HASH_VALUE.match(match.group(1))
        if value is None or len(value.group(2)) != hashlib.new(value.group(1)).digest_size * 2:
            break
        if text[match.end():].strip():  # something other than hashes after it
            break
        hashes.append(f"{value.group(1)}:{value.group(2).lower()}")
        text = text[:match.start()] + text[match.end():]
    return text.strip(), sorted(set(hashes))


def pip_requirement_text(line: str) -> str:
    """A normalised pip line without its ``--hash`` options: what ``packaging`` parses."""
    return line.split(" --hash=", 1)[0]


def pytorch_local_label(requirement: Requirement) -> str | None:
    """`cu118` of `torch==2.0.1+cu118`: a local version only PyTorch's own index serves."""
    for specifier in requirement.specifier:
        _, plus, label = specifier.version.partition("+")
        if plus and _PYTORCH_LABEL.match(label):
            return label
    return None


def pytorch_cuda(label: str) -> str:
    """`pytorch-cuda=11.8` for `cu118`; `cpuonly` for `cpu`; nothing otherwise."""
    if label == "cpu":
        return ", cpuonly"
    digits = label[2:] if label.startswith("cu") else ""
    if len(digits) >= 3 and digits.isdigit():
        return f", pytorch-cuda={digits[:-1]}.{digits[-1]}"
    return ", pytorch-cuda=<your CUDA version>"
