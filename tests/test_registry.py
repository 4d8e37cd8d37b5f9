"""Images through a registry: the distribution-API client, push/pull accounting, failures.

These tests need no Docker daemon: the registry client runs against a stand-in registry
served on 127.0.0.1 (token auth, OCI manifests and indexes) and against the bench's
docker-registry serving HTTPS (TLS verification), and the push/pull tallies read event
streams recorded from the bench daemon. Pushes and pulls through a real registry are in
test_registry_bench.py.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading

import pytest
from traitlets import TraitError

from jupyterhub_condaspawner.builder import BuildError, ImageBuilder, _transfer_failure, daemon_settings
from jupyterhub_condaspawner.failures import explain
from jupyterhub_condaspawner.registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Layer,
    PullTally,
    PushTally,
    RegistryClient,
    RegistryError,
    RemoteImage,
    Repository,
    failure_is_unreachable,
)

# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["registry.example.edu:5000/condaspawner-env", "127.0.0.1:5000/a/b",
                                  "localhost/envs", "ghcr.io/lab/condaspawner-env"])
def test_registry_qualified_repositories_are_accepted(text):
    repository = Repository.parse(text)
    assert repository.name == text and ImageBuilder(registry=text).registry == text


@pytest.mark.parametrize("text, why", [
    ("condaspawner-env", "not a registry-qualified repository"),  # would go to Docker Hub
    ("lab/condaspawner-env", "not a registry-qualified repository"),
    ("registry.example.edu:5000/Envs", "not a valid repository path"),
    ("registry.example.edu:5000/envs:latest", "not a valid repository path"),  # a tag, not a repository
])
def test_unqualified_or_tagged_registries_are_refused(text, why):
    with pytest.raises(TraitError, match=why):
        ImageBuilder(registry=text)


def test_an_image_in_the_registry_is_run_pinned_by_digest():
    image = RemoteImage(Repository.parse("r.example.edu:5000/envs"), "0123456789abcdef", "sha256:" + "d" * 64,
                        "sha256:" + "c" * 64, {}, (Layer("sha256:" + "1" * 64, 10), Layer("sha256:" + "1" * 64, 10),
                                                   Layer("sha256:" + "2" * 64, 5)))
    assert image.reference == "r.example.edu:5000/envs:0123456789abcdef@sha256:" + "d" * 64
    assert image.size == 15  # a layer listed twice is stored and pulled once


# -- the daemon's push and pull streams --------------------------------------------------------

DIFF_IDS = ["sha256:" + c * 64 for c in "abc"]
PUSHED_IMAGE = RemoteImage(Repository.parse("127.0.0.1:5000/envs"), "t", "sha256:" + "f" * 64, "sha256:" + "e" * 64,
                           {}, (Layer("sha256:" + "1" * 64, 1000), Layer("sha256:" + "2" * 64, 200),
                                Layer("sha256:" + "3" * 64, 30)), config_size=7, manifest_size=5)


def test_bytes_pushed_count_only_the_layers_the_registry_lacked():
    tally = PushTally(DIFF_IDS)
    events = [
        {"status": "The push refers to repository [127.0.0.1:5000/envs]"},
        *({"status": "Preparing", "progressDetail": {}, "id": c * 12} for c in "abc"),
        {"status": "Layer already exists", "progressDetail": {}, "id": "a" * 12},
        {"status": "Pushing", "progressDetail": {"current": 512, "total": 4096}, "id": "b" * 12},
        {"status": "Mounted from lab/other", "progressDetail": {}, "id": "c" * 12},
        {"status": "Pushed", "progressDetail": {}, "id": "b" * 12},
        {"status": "t: digest: sha256:" + "f" * 64 + " size: 5"},
        {"progressDetail": {}, "aux": {"Tag": "t", "Digest": "sha256:" + "f" * 64, "Size": 5}},
    ]
    finished = [tally.feed(event) for event in events]
    assert finished.count(True) == 3 and not tally.error
    assert (tally.layers, tally.done, tally.uploaded, tally.digest) == (3, 3, 1, "sha256:" + "f" * 64)
    assert tally.bytes_pushed(PUSHED_IMAGE) == 200 + 7 + 5  # the new layer, the config, the manifest


def test_a_push_error_in_the_stream_is_kept_and_classified():
    tally = PushTally(DIFF_IDS)
    refused = 'Get "http://127.0.0.1:35505/v2/": dial tcp 127.0.0.1:35505: connect: connection refused'
    tally.feed({"errorDetail": {"message": refused}, "error": refused})
    assert tally.error == refused and failure_is_unreachable(tally.error)
    assert not failure_is_unreachable("unauthorized: authentication required")
    assert not failure_is_unreachable("denied: requested access to the resource is denied")
    assert not failure_is_unreachable("manifest for x@sha256:" + "503a" * 16 + " not found")

    error = _transfer_failure("pushing the image to 127.0.0.1:35505", "127.0.0.1:35505", refused, "k" * 64)
    assert (error.phase, error.unreachable) == ("registry", True)
    assert error.cause == "the registry 127.0.0.1:35505 cannot be reached (connection refused)"


def test_a_registry_that_fails_with_a_server_error_is_named_for_it_not_a_refusal():
    # What docker reports after its retries when the registry's disk is full (HTTP 500).
    full = "received unexpected HTTP status: 500 Internal Server Error"
    assert not failure_is_unreachable(full)
    error = _transfer_failure("pushing the image to 10.0.0.5:5000", "10.0.0.5:5000", full, "k" * 64)
    assert error.phase == "registry-failed" and not error.unreachable
    failure = explain(error, custom_spec=False)
    assert (failure.status_code, failure.reason) == (503, "registry-failed")
    assert failure.message == (
        "The image registry failed: the registry 10.0.0.5:5000 failed pushing the image to 10.0.0.5:5000 "
        "(received unexpected HTTP status: 500 Internal Server Error): its storage may be full; its log says why; "
        f"tell the hub admin (build {'k' * 16}: `condaspawner log {'k' * 16}`)")
    refused = _transfer_failure("pushing", "10.0.0.5:5000", "unauthorized: authentication required", "k" * 64)
    assert refused.phase == "registry"


def test_pull_progress_counts_the_bytes_this_node_lacks():
    tally = PullTally(PUSHED_IMAGE.layers)
    for event in [
        {"status": "Pulling from envs", "id": "sha256:" + "f" * 64},
        {"status": "Already exists", "progressDetail": {}, "id": "1" * 12},
        {"status": "Pulling fs layer", "progressDetail": {}, "id": "2" * 12},
        {"status": "Pulling fs layer", "progressDetail": {}, "id": "3" * 12},
        {"status": "Downloading", "progressDetail": {"current": 50, "total": 200}, "id": "2" * 12},
    ]:
        tally.feed(event)
    assert (tally.total, tally.done, tally.already) == (230, 50, 1)
    tally.feed({"status": "Download complete", "progressDetail": {}, "id": "2" * 12})
    tally.feed({"status": "Pull complete", "progressDetail": {}, "id": "3" * 12})
    assert tally.done == tally.total == 230 and not tally.error


# -- failures reach the user as one line --------------------------------------------------------


def test_a_registry_that_is_down_is_a_503_worth_retrying():
    error = BuildError("looking up 127.0.0.1:5999/envs:0123: the registry 127.0.0.1:5999 cannot be reached "
                       "(connection refused)", phase="registry", unreachable=True,
                       cause="the registry 127.0.0.1:5999 cannot be reached (connection refused)")
    failure = explain(error, custom_spec=False)
    assert (failure.status_code, failure.reason) == (503, "registry")
    assert failure.message == ("The image registry is unavailable: the registry 127.0.0.1:5999 cannot be reached "
                               "(connection refused); try again in a minute, or tell the hub admin if it keeps "
                               "failing")


def test_a_registry_that_refuses_the_hub_is_the_admins_to_fix():
    error = BuildError("x", phase="registry", cause="the registry r.example.edu refused access to envs (401 "
                       "UNAUTHORIZED): check the credentials in Docker's config")
    failure = explain(error, custom_spec=True)
    assert (failure.status_code, failure.reason) == (500, "registry-refused")
    assert failure.message.startswith("The image registry refused the hub: the registry r.example.edu refused")
    assert failure.message.endswith("tell the hub admin")


# -- one daemon ---------------------------------------------------------------------------------


def test_daemon_settings_are_made_as_dockerspawner_makes_its_client(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/from-env.sock")
    assert daemon_settings()["base_url"] == "unix:///run/from-env.sock"
    settings = daemon_settings({"verify": False}, {"base_url": "tcp://docker.example.edu:2376", "timeout": 9})
    assert settings["base_url"] == "tcp://docker.example.edu:2376" and settings["timeout"] == 9  # client_kwargs win
    assert settings["tls"].verify is False and settings["version"] == "auto"


def test_a_dedicated_build_host_wins_over_the_servers_daemon():
    builder = ImageBuilder(daemon_settings={"base_url": "unix:///run/servers.sock", "version": "auto"})
    assert builder.client_settings()["base_url"] == "unix:///run/servers.sock"
    builder.docker_host = "tcp://build.example.edu:2376"
    builder.docker_tls_config = {"verify": False}
    settings = builder.client_settings()
    assert settings["base_url"] == "tcp://build.example.edu:2376" and settings["tls"].verify is False


# -- the distribution API against a stand-in registry --------------------------------------------


class StandInRegistry(http.server.ThreadingHTTPServer):
    """A registry with token auth: manifests and blobs need a bearer token the /token service
    hands out for the basic credentials in Docker's config."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), StandInHandler)
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[str, bytes]] = {}  # tag or digest -> (media type, body)
        self.token_requests: list[dict] = []
        self.accept: list[str] = []

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def add_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def add_manifest(self, tags: list[str], media_type: str, manifest: dict) -> str:
        body = json.dumps(manifest).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        for ref in (*tags, digest):
            self.manifests[ref] = (media_type, body)
        return digest


class StandInHandler(http.server.BaseHTTPRequestHandler):
    server: StandInRegistry

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/token?"):
            auth = self.headers.get("Authorization", "")
            self.server.token_requests.append({"path": self.path, "authorization": auth})
            if auth != "Basic " + base64.b64encode(b"hub:hub-s3cret").decode():
                return self._reply(401, b"{}")
            return self._reply(200, json.dumps({"token": "t0ken"}).encode())
        if self.headers.get("Authorization") != "Bearer t0ken":
            realm = f"http://{self.server.host}/token"
            challenge = f'Bearer realm="{realm}",service="stand-in",scope="repository:lab/envs:pull"'
            return self._reply(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge})
        prefix = "/v2/lab/envs/"
        if self.path.startswith(prefix + "manifests/"):
            self.server.accept.append(self.headers.get("Accept", ""))
            found = self.server.manifests.get(self.path.removeprefix(prefix + "manifests/"))
            if found is None:
                return self._reply(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}')
            return self._reply(200, found[1], {"Content-Type": found[0]})
        if self.path.startswith(prefix + "blobs/"):
            data = self.server.blobs.get(self.path.removeprefix(prefix + "blobs/"))
            return self._reply(200, data) if data is not None else self._reply(404, b"{}")
        return self._reply(404, b"{}")

    def _reply(self, status: int, body: bytes, headers: dict | None = None):
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    server = StandInRegistry()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = tmp_path / "docker-config"
    config.mkdir()
    auth = base64.b64encode(b"hub:hub-s3cret").decode()
    (config / "config.json").write_text(json.dumps({"auths": {server.host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    yield server
    server.shutdown()
    server.server_close()


def oci_image(server: StandInRegistry, key: str) -> dict:
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Labels": {"io.condaspawner.key": key}}}).encode()
    layer = server.add_blob(b"layer")
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": server.add_blob(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": 5}]}


def test_token_auth_with_dockers_credentials_and_oci_manifests(stand_in):
    manifest = oci_image(stand_in, "k" * 64)
    digest = stand_in.add_manifest(["kkkk"], OCI_MANIFEST, manifest)
    client = RegistryClient(Repository.parse(f"{stand_in.host}/lab/envs"), insecure=True)

    image = client.image("kkkk")

    assert image is not None and image.labels == {"io.condaspawner.key": "k" * 64}
    assert image.digest == digest and image.reference == f"{stand_in.host}/lab/envs:kkkk@{digest}"
    assert image.config_digest == manifest["config"]["digest"] and image.size == 5
    assert "service=stand-in" in stand_in.token_requests[0]["path"]
    assert "scope=repository%3Alab%2Fenvs%3Apull" in stand_in.token_requests[0]["path"]
    assert all(kind in stand_in.accept[0] for kind in (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX))
    assert client.image("no-such-tag") is None  # 404: not a hit, not an error
    assert len(stand_in.token_requests) == 1  # the token is reused


def test_an_index_is_resolved_to_this_platform_and_pinned_by_the_index(stand_in):
    arm = stand_in.add_manifest([], OCI_MANIFEST, oci_image(stand_in, "arm-key"))
    amd = stand_in.add_manifest([], OCI_MANIFEST, oci_image(stand_in, "amd-key"))
    index = stand_in.add_manifest(["multi"], OCI_INDEX, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": arm, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": OCI_MANIFEST, "digest": amd, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
    ]})
    image = RegistryClient(Repository.parse(f"{stand_in.host}/lab/envs"), insecure=True).image("multi")
    assert image is not None and image.labels["io.condaspawner.key"] == "amd-key" and image.digest == index


def test_wrong_credentials_and_a_registry_that_is_not_listed_as_insecure(stand_in, tmp_path, monkeypatch):
    stand_in.add_manifest(["t"], OCI_MANIFEST, oci_image(stand_in, "k"))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"auths": {stand_in.host: {"auth": base64.b64encode(
        b"hub:nope").decode()}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(wrong))
    with pytest.raises(RegistryError, match="refused the credentials") as refused:
        RegistryClient(Repository.parse(f"{stand_in.host}/lab/envs"), insecure=True).image("t")
    assert not refused.value.unreachable

    # Not listed as insecure: HTTPS with verification, which a plain-HTTP registry cannot answer.
    with pytest.raises(RegistryError) as no_tls:
        RegistryClient(Repository.parse(f"{stand_in.host}/lab/envs"), insecure=False).image("t")
    assert "insecure_registries" in str(no_tls.value) or no_tls.value.unreachable


def test_a_registry_with_nothing_listening_is_unreachable():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RegistryError) as down:
        RegistryClient(Repository.parse(f"127.0.0.1:{port}/envs"), insecure=True, timeout=5).image("t")
    assert down.value.unreachable
    assert str(down.value) == f"the registry 127.0.0.1:{port} cannot be reached (connection refused)"


def test_every_builder_setting_shows_a_config_example():
    for name, trait in ImageBuilder.class_traits(config=True).items():
        assert f"c.ImageBuilder.{name} = " in trait.help, name


# -- TLS against a real registry (Debian's docker-registry serving HTTPS) -------------------------


def self_signed(directory) -> tuple:
    """A certificate for 127.0.0.1 (and its key), as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "condaspawner bench registry")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "registry.crt", directory / "registry.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_registry(tmp_path):
    from fixtures_docker import bench_unavailable

    from condaspawner_bench.registry import BenchRegistryError, start_registry

    cert, key = self_signed(tmp_path)
    try:
        server = start_registry(tmp_path / "tls-registry", tls=(cert, key))
    except BenchRegistryError as error:
        bench_unavailable(f"no registry for the bench: {error}")
    yield server, cert
    server.stop()


def test_tls_is_verified_unless_the_registry_is_listed_as_insecure(tls_registry, monkeypatch):
    import certifi

    server, cert = tls_registry
    repository = Repository.parse(server.repository("envs"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # public CAs only: not this certificate
    with pytest.raises(RegistryError, match=r"TLS failed .*list it in c.ImageBuilder.insecure_registries") as bad:
        RegistryClient(repository).image("t")
    assert not bad.value.unreachable
    assert RegistryClient(repository, insecure=True).image("t") is None  # listed: HTTPS, not verified

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # the hub trusts its CA: verified HTTPS
    client = RegistryClient(repository)
    assert client.image("t") is None and client._base_url == f"https://{server.host}"
