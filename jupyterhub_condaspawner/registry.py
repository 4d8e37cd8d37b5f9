"""Environment images through a registry: the distribution-API client, push and pull.

With ``c.ImageBuilder.registry`` set, the registry is the image cache that every hub
process and build host shares (as BinderHub does): a lookup asks it for the manifest
of ``<registry>:<key[:16]>`` and checks the image config's ``io.condaspawner.key``
label against the full key; a build is pushed there; a server runs the reference
pinned by digest (``<registry>:<tag>@sha256:...``), which the servers' Docker daemon
pulls when it lacks it.

Registry API calls (OCI distribution spec: manifests and blobs) go through requests,
with the credentials of Docker's own config (``~/.docker/config.json`` or
``$DOCKER_CONFIG``, credential helpers included), basic or token auth. HTTPS is
verified unless the registry is listed as insecure (then HTTPS without verification,
else plain HTTP, as Docker does). Pushes and pulls are the Docker daemon's; this
module turns their event streams into byte counts and one-line progress messages.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import docker.auth
import docker.errors
import requests
import requests.exceptions
import urllib3.exceptions

from .oneline import one_line

# What a manifest GET accepts: single-platform manifests first, then indexes.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# docker's reference grammar, enough to refuse what the daemon would refuse.
_HOST = re.compile(r"^(localhost|[a-zA-Z0-9.-]+\.[a-zA-Z0-9-]+|[a-zA-Z0-9.-]+:[0-9]+|\[[0-9a-fA-F:]+\](:[0-9]+)?)$")
_PATH = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
# Words in a push/pull error that mean the registry could not be reached (worth a retry).
_UNREACHABLE = re.compile(r"connection refused|no such host|timeout|timed out|dial tcp|connection reset|\bEOF\b"
                          r"|\b50[234]\b|service unavailable|bad gateway|no route to host", re.IGNORECASE)
# ... that mean it answered, with a server error of its own (a full disk, a broken storage driver).
_SERVER_FAILED = re.compile(r"\b50[07]\b|internal server error|insufficient storage|no space left", re.IGNORECASE)
_REFUSED = re.compile(r"unauthorized|authentication required|denied|forbidden|no basic auth credentials",
                      re.IGNORECASE)
_MESSAGE_CHARS = 300
ARCHITECTURES = {"linux-64": "amd64", "linux-aarch64": "arm64", "linux-ppc64le": "ppc64le", "linux-s390x": "s390x"}


class RegistryError(Exception):
    """A registry that cannot be reached (``unreachable``: worth a retry) or that refused us."""

    def __init__(self, message: str, *, unreachable: bool = False, problem: str = ""):
        super().__init__(message)
        self.unreachable = unreachable
        self.problem = problem  # why it cannot be reached, in a few words ("connection refused")


@dataclass(frozen=True)
class Repository:
    """``registry.example.edu:5000/condaspawner-env``: the registry's host and the repository path."""

    host: str
    path: str

    @classmethod
    def parse(cls, text: str) -> Repository:
        """A registry-qualified repository; ValueError for anything else (a tag, a bare name)."""
        host, _, path = text.strip().partition("/")
        if not path or not _HOST.match(host):
            raise ValueError(f"{text!r} is not a registry-qualified repository such as "
                             "'registry.example.edu:5000/condaspawner-env' (an unqualified name makes Docker "
                             "use Docker Hub)")
        if not _PATH.match(path):
            raise ValueError(f"{text!r}: {path!r} is not a valid repository path (lowercase letters, digits, "
                             "'.', '_', '-' and '/'; no tag)")
        return cls(host, path)

    @property
    def name(self) -> str:
        return f"{self.host}/{self.path}"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int


@dataclass(frozen=True)
class RemoteImage:
    """An image in the registry: its manifest's digest, its config's digest and labels, its layers."""

    repository: Repository
    tag: str
    digest: str
    config_digest: str
    labels: dict[str, str]
    layers: tuple[Layer, ...]
    config_size: int = 0
    manifest_size: int = 0

    @property
    def reference(self) -> str:
        """``<registry>/<path>:<tag>@sha256:...``: what servers run (the tag only helps people read it)."""
        return f"{self.repository.name}:{self.tag}@{self.digest}"

    @property
    def size(self) -> int:
        """Compressed bytes of all its layers (what a node without any of them downloads)."""
        return sum(layer.size for layer in _unique(self.layers))


def _unique(layers: Iterable[Layer]) -> list[Layer]:
    seen: dict[str, Layer] = {}
    for layer in layers:
        seen.setdefault(layer.digest, layer)
    return list(seen.values())


def docker_credentials(host: str) -> dict[str, str] | None:
    """Docker's credentials for ``host`` (``username``/``password`` or ``identitytoken``), or None.

    Read from Docker's usual config each time (``$DOCKER_CONFIG/config.json`` or
    ``~/.docker/config.json``, with ``credsStore``/``credHelpers``), as ``docker login`` wrote it.
    """
    try:
        entry = docker.auth.resolve_authconfig(docker.auth.load_config(), registry=host)
    except docker.errors.DockerException as error:  # a credential helper that fails
        raise RegistryError(f"cannot read the credentials for {host} from Docker's config: {_one_line(error)}")
    if not entry:
        return None
    entry = {str(k).lower(): v for k, v in entry.items() if v}
    credentials = {k: entry[k] for k in ("username", "password", "identitytoken") if k in entry}
    return credentials or None


class RegistryClient:
    """Manifests and configs of one repository, over the OCI distribution API."""

    def __init__(self, repository: Repository, *, insecure: bool = False, timeout: float = 30.0,
                 architecture: str = "amd64"):
        self.repository = repository
        self.insecure = insecure
        self.timeout = timeout
        self.architecture = architecture
        self._session = requests.Session()
        self._base_url = ""
        self._tokens: dict[str, str] = {}  # scope -> bearer token
        self._configs: dict[str, dict[str, Any]] = {}  # config digest -> config (content-addressed)
        self._lock = threading.Lock()

    # -- what the builder asks --------------------------------------------------------------

    def image(self, reference: str) -> RemoteImage | None:
        """The image a tag or digest names, or None if the registry has no such manifest."""
        found = self.manifest(reference)
        if found is None:
            return None
        digest, media_type, body, size = found
        if media_type in INDEX_TYPES or "manifests" in body:
            return self._from_index(reference, digest, body)
        return self._image(reference, digest, body, size)

    def manifest(self, reference: str) -> tuple[str, str, dict[str, Any], int] | None:
        """(digest, media type, manifest, size in bytes) of a tag or digest, or None (404)."""
        response = self._request("GET", f"manifests/{reference}", headers={"Accept": ", ".join(MANIFEST_TYPES)},
                                 allow_missing=True)
        if response is None:
            return None
        raw = response.content
        digest = response.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(raw).hexdigest()
        try:
            body = json.loads(raw)
        except ValueError:
            raise RegistryError(f"{self._where()} sent a manifest that is not JSON for {reference}")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip() or body.get("mediaType", "")
        return digest, media_type, body, len(raw)

    def config(self, digest: str) -> dict[str, Any]:
        """An image config blob (cached: a digest never changes its content)."""
        with self._lock:
            cached = self._configs.get(digest)
        if cached is not None:
            return cached
        response = self._request("GET", f"blobs/{digest}")
        assert response is not None
        if "sha256:" + hashlib.sha256(response.content).hexdigest() != digest:
            raise RegistryError(f"{self._where()} sent a config blob that does not match its digest {digest[:19]}")
        config = json.loads(response.content)
        with self._lock:
            self._configs[digest] = config
        return config

    def check(self) -> None:
        """Raise RegistryError unless the registry answers the API base with our credentials."""
        self._request("GET", "", allow_missing=False)

    # -- manifests -----------------------------------------------------------------------------

    def _from_index(self, reference: str, digest: str, index: dict[str, Any]) -> RemoteImage | None:
        for entry in index.get("manifests", []):
            platform = entry.get("platform") or {}
            if platform.get("os") == "linux" and platform.get("architecture") == self.architecture:
                found = self.manifest(entry["digest"])
                if found is None:
                    return None
                image = self._image(reference, found[0], found[2], found[3])
                # Pin the index, as `docker pull` of a multi-platform tag does.
                return RemoteImage(image.repository, image.tag, digest, image.config_digest, image.labels,
                                   image.layers, image.config_size, image.manifest_size)
        return None

    def _image(self, reference: str, digest: str, manifest: dict[str, Any], size: int) -> RemoteImage:
        config_ref = manifest.get("config") or {}
        if "digest" not in config_ref:
            raise RegistryError(f"{self._where()}: the manifest of {reference} has no config (schema 1?)")
        config = self.config(config_ref["digest"])
        labels = (config.get("config") or {}).get("Labels") or {}
        layers = tuple(Layer(layer["digest"], int(layer.get("size", 0))) for layer in manifest.get("layers", []))
        tag = "" if reference.startswith("sha256:") else reference
        return RemoteImage(self.repository, tag, digest, config_ref["digest"], dict(labels), layers,
                           int(config_ref.get("size", 0)), size)

    # -- HTTP, auth, TLS ---------------------------------------------------------------------

    def _where(self) -> str:
        return f"the registry {self.repository.host}"

    def _url(self, path: str) -> str:
        if not self._base_url:
            self._base_url = self._probe_scheme()
        suffix = f"{self.repository.path}/{path}" if path else ""
        return f"{self._base_url}/v2/{suffix}"

    def _probe_scheme(self) -> str:
        """https://host, verified; for an insecure registry unverified https, else http (as Docker tries)."""
        https = f"https://{self.repository.host}"
        if not self.insecure:
            return https
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                self._session.get(https + "/v2/", timeout=self.timeout, verify=False)
            return https
        except requests.exceptions.SSLError:
            return f"http://{self.repository.host}"
        except requests.exceptions.RequestException as error:
            problem = connection_problem(error)
            raise RegistryError(f"{self._where()} cannot be reached ({problem})", unreachable=True, problem=problem)

    def _request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                 allow_missing: bool = False) -> requests.Response | None:
        headers = dict(headers or {})
        scope = f"repository:{self.repository.path}:pull"
        if scope in self._tokens:
            headers["Authorization"] = f"Bearer {self._tokens[scope]}"
        response = self._send(method, self._url(path), headers)
        if response.status_code == 401:
            headers["Authorization"] = self._authorization(response, scope)
            response = self._send(method, self._url(path), headers)
        if response.status_code == 404 and allow_missing:
            return None
        if response.status_code in (401, 403):
            raise RegistryError(f"{self._where()} refused access to {self.repository.path} "
                                f"({response.status_code} {_error_text(response)}): check the credentials in "
                                "Docker's config (`docker login` as the hub's user, or DOCKER_CONFIG)")
        if response.status_code >= 500:
            raise RegistryError(f"{self._where()} failed ({response.status_code} {_error_text(response)})",
                                unreachable=True)
        if response.status_code >= 400:
            raise RegistryError(f"{self._where()} answered {response.status_code} {_error_text(response)} "
                                f"for {path or '/v2/'}")
        return response

    def _send(self, method: str, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            with warnings.catch_warnings():  # an insecure registry is the admin's explicit choice
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                return self._session.request(method, url, headers=headers, timeout=self.timeout,
                                             verify=not self.insecure)
        except requests.exceptions.SSLError as error:
            raise RegistryError(f"{self._where()}: TLS failed ({_one_line(error)}); if it has no trusted "
                                "certificate, list it in c.ImageBuilder.insecure_registries")
        except requests.exceptions.RequestException as error:
            problem = connection_problem(error)
            raise RegistryError(f"{self._where()} cannot be reached ({problem})", unreachable=True, problem=problem)

    def _authorization(self, challenge: requests.Response, scope: str) -> str:
        """The Authorization header that answers a 401: Basic with Docker's credentials, or a Bearer token."""
        header = challenge.headers.get("WWW-Authenticate", "")
        scheme, _, params_text = header.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        credentials = docker_credentials(self.repository.host)
        if scheme.lower() == "basic":
            if not credentials or "username" not in credentials:
                raise RegistryError(f"{self._where()} asks for credentials and Docker's config has none for "
                                    f"{self.repository.host} (`docker login {self.repository.host}` as the hub's "
                                    "user, or set DOCKER_CONFIG)")
            return _basic(credentials["username"], credentials.get("password", ""))
        if scheme.lower() == "bearer" and params.get("realm"):
            token = self._token(params, scope, credentials)
            self._tokens[scope] = token
            return f"Bearer {token}"
        raise RegistryError(f"{self._where()} asks for an authentication it does not name ({header[:80]!r})")

    def _token(self, params: dict[str, str], scope: str, credentials: dict[str, str] | None) -> str:
        """A token from the registry's token service (Docker's token auth), with credentials if we have them."""
        query = {"scope": params.get("scope") or scope}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {}
        if credentials and "username" in credentials:
            headers["Authorization"] = _basic(credentials["username"], credentials.get("password", ""))
        realm = params["realm"]
        response = None
        if credentials and "identitytoken" in credentials:  # OAuth2 refresh token from `docker login`
            response = self._token_request("POST", realm, data={
                "grant_type": "refresh_token", "refresh_token": credentials["identitytoken"],
                "client_id": "jupyterhub-condaspawner", **query})
        else:
            response = self._token_request("GET", realm, params=query, headers=headers)
        if response.status_code in (401, 403):
            raise RegistryError(f"the token service of {self.repository.host} refused the credentials in "
                                f"Docker's config ({response.status_code})")
        if response.status_code >= 400:
            raise RegistryError(f"the token service of {self.repository.host} answered {response.status_code}",
                                unreachable=response.status_code >= 500)
        body = response.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError(f"the token service of {self.repository.host} sent no token")
        return token

    def _token_request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            return self._session.request(method, url, timeout=self.timeout, verify=not self.insecure, **kwargs)
        except requests.exceptions.RequestException as error:
            raise RegistryError(f"the token service of {self.repository.host} ({urllib.parse.urlsplit(url).netloc}) "
                                f"cannot be reached ({connection_problem(error)})", unreachable=True)


def connection_problem(error: BaseException | str) -> str:
    """A failed connection (an exception, or the daemon's error text) in a few words, e.g.
    "connection refused", not urllib3's paragraph."""
    text = str(error)
    if isinstance(error, requests.exceptions.Timeout) or "timeout" in text.lower():
        return "no answer in time"
    for marker, words in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                          ("Temporary failure in name resolution", "its name does not resolve"),
                          ("No route to host", "no route to host"), ("Connection reset", "connection reset"),
                          ("RemoteDisconnected", "the connection closed")):
        if marker.lower() in text.lower():
            return words
    return _one_line(text)[:120]


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _error_text(response: requests.Response) -> str:
    """The registry's error code(s), e.g. UNAUTHORIZED, else the HTTP reason."""
    try:
        errors = response.json().get("errors") or []
        codes = [str(error.get("code")) for error in errors if error.get("code")]
    except (ValueError, AttributeError):
        codes = []
    return ", ".join(codes) or response.reason or ""


# -- the daemon's push and pull streams ----------------------------------------------------


@dataclass
class PushTally:
    """Docker's push events, per layer: which it uploaded, which the registry already had.

    Docker names each layer by its diff ID's first 12 hex digits; the pushed manifest
    lists the same layers, in the same order as the image's diff IDs, with their
    compressed sizes: the bytes pushed are those of the layers Docker uploaded, plus the
    config and the manifest.
    """

    diff_ids: list[str]
    statuses: dict[str, str] = field(default_factory=dict)
    digest: str = ""
    error: str = ""

    def feed(self, event: dict[str, Any]) -> bool:
        """Take one event; True when a layer finished (worth a progress message)."""
        if event.get("error") or event.get("errorDetail"):
            self.error = _one_line(event.get("error") or event["errorDetail"].get("message", ""))
            return False
        self.digest = (event.get("aux") or {}).get("Digest", self.digest)
        status, layer = str(event.get("status", "")), event.get("id")
        if not layer or layer not in self._short_ids:
            return False
        if status == "Pushed":
            self.statuses[layer] = "pushed"
            return True
        if status == "Layer already exists" or status.startswith("Mounted from"):
            self.statuses[layer] = "existed"
            return True
        return False

    @property
    def _short_ids(self) -> set[str]:
        return {diff_id.removeprefix("sha256:")[:12] for diff_id in self.diff_ids}

    @property
    def layers(self) -> int:
        return len(self._short_ids)

    @property
    def done(self) -> int:
        return len(self.statuses)

    @property
    def uploaded(self) -> int:
        return sum(1 for status in self.statuses.values() if status == "pushed")

    def bytes_pushed(self, image: RemoteImage) -> int:
        """Compressed bytes uploaded: the new layers, the config and the manifest."""
        new: dict[str, int] = {}
        for diff_id, layer in zip(self.diff_ids, image.layers):
            if self.statuses.get(diff_id.removeprefix("sha256:")[:12]) == "pushed":
                new[layer.digest] = layer.size
        return sum(new.values()) + image.config_size + image.manifest_size


@dataclass
class PullTally:
    """Docker's pull events, per layer (named by the first 12 hex digits of its blob digest): bytes so far."""

    layers: tuple[Layer, ...]
    downloaded: dict[str, int] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)
    error: str = ""

    def __post_init__(self) -> None:
        self._sizes = {layer.digest.removeprefix("sha256:")[:12]: layer.size for layer in _unique(self.layers)}

    def feed(self, event: dict[str, Any]) -> None:
        if event.get("error") or event.get("errorDetail"):
            self.error = _one_line(event.get("error") or event["errorDetail"].get("message", ""))
            return
        layer, status = event.get("id"), str(event.get("status", ""))
        if layer not in self._sizes:
            return
        if status == "Already exists":
            self.present.add(layer)
        elif status == "Downloading":
            self.downloaded[layer] = int((event.get("progressDetail") or {}).get("current") or 0)
        elif status in ("Download complete", "Verifying Checksum", "Extracting", "Pull complete"):
            self.downloaded[layer] = self._sizes[layer]

    @property
    def total(self) -> int:
        """Bytes this node must download: the layers it did not already have."""
        return sum(size for layer, size in self._sizes.items() if layer not in self.present)

    @property
    def done(self) -> int:
        return min(sum(self.downloaded.get(layer, 0) for layer in self._sizes if layer not in self.present),
                   self.total)

    @property
    def already(self) -> int:
        return len(self.present)


def failure_is_server_error(text: str) -> bool:
    """Whether a push/pull error from the daemon is the registry's own failure (HTTP 500, 507)."""
    return not _REFUSED.search(text) and bool(_SERVER_FAILED.search(text))


def failure_is_unreachable(text: str) -> bool:
    """Whether a push/pull error from the daemon means the registry could not be reached."""
    return not _REFUSED.search(text) and bool(_UNREACHABLE.search(text))


class Throttle:
    """True at most every ``seconds`` (progress messages must not flood the spawn page)."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds
        self._last = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.seconds:
            self._last = now
            return True
        return False


def _one_line(value: object) -> str:
    return one_line(value, _MESSAGE_CHARS)
