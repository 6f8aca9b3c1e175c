"""Bearer tokens, TLS and mTLS on real shard processes; health and reflection stay open.

Certificates (a CA, a server certificate for 127.0.0.1/localhost, a client certificate and
an unrelated CA) are made at test time with ``cryptography`` when it is installed, else
with the ``openssl`` command line; without either the TLS tests are skipped.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ps_harness import Cluster, Reference, Security, ShardGroup, assert_rows_equal

from recps.embedding import OptimizerConfig, TableConfig
from recps.embedding import errors as E
from recps.proto import ps_pb2, ps_pb2_grpc
from recps.ps.client import PSClient
from recps.ps.config import ClientConfig, TlsConfig

C = grpc.StatusCode
SERVICE = "recps.ps.v1.ParameterServer"
TOKEN = "s3cret-token"
CFG = TableConfig("sec", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1))


# ---- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA: trusts nothing of the above
    other_client_cert: Path  # a client certificate signed by other_ca
    other_client_key: Path


def _make_with_cryptography(d: Path) -> Certs:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, usage=None, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san is not None:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def new_key():
        return ec.generate_private_key(ec.SECP256R1())

    def write(c, path: Path) -> None:
        path.write_bytes(c.public_bytes(serialization.Encoding.PEM))

    out = {}
    for ca_name, prefix in (("recps test CA", ""), ("other CA", "other_")):
        ca_key = new_key()
        write(cert(ca_name, ca_key, ca_name, ca_key, ca=True), d / f"{prefix}ca.pem")
        out[f"{prefix}ca"] = d / f"{prefix}ca.pem"
        ck = new_key()
        write_key(ck, d / f"{prefix}client.key")
        client = cert(
            "client", ck, ca_name, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH
        )
        write(client, d / f"{prefix}client.pem")
        if not prefix:
            sk = new_key()
            write_key(sk, d / "server.key")
            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            server = cert(
                "localhost",
                sk,
                ca_name,
                ca_key,
                ca=False,
                usage=ExtendedKeyUsageOID.SERVER_AUTH,
                san=san,
            )
            write(server, d / "server.pem")
    return Certs(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "other_ca.pem",
        d / "other_client.pem",
        d / "other_client.key",
    )


def _make_with_openssl(d: Path) -> Certs:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for prefix, cn in (("", "recps test CA"), ("other_", "other CA")):
        run(
            "req", "-x509", *ec, "-keyout", f"{prefix}ca.key", "-out", f"{prefix}ca.pem",
            "-days", "2", "-subj", f"/CN={cn}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    leaves = [
        ("server", "", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "", "extendedKeyUsage=clientAuth"),
        ("other_client", "other_", "extendedKeyUsage=clientAuth"),
    ]
    for name, ca, ext in leaves:
        (d / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\n{ext}\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}ca.pem", "-CAkey", f"{ca}ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-sha256",
            "-extfile", f"{name}.ext",
        )  # fmt: skip
    return Certs(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "other_ca.pem",
        d / "other_client.pem",
        d / "other_client.key",
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("TLS tests need the `cryptography` package or the `openssl` CLI")
        return _make_with_openssl(d)
    return _make_with_cryptography(d)


# ---- helpers ------------------------------------------------------------------------------


def health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status


def reflected_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=30))
    return {s.name for s in resp.list_services_response.service}


def code_of(fn, *args, **kw) -> grpc.StatusCode:
    kw.setdefault("timeout", 30)  # a hang fails the test instead of stalling it
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, **kw)
    return ei.value.code()


def train_and_check(client: PSClient) -> None:
    """Create, push, look up through ``client``; rows must equal the reference."""
    ref = Reference([CFG])
    rng = np.random.default_rng(0)
    client.create_table(CFG)
    ids = rng.integers(-(2**62), 2**62, 50)
    for _ in range(2):
        push = {"sec": (ids, rng.normal(size=(50, 4)).astype(np.float32))}
        client.push(push)
        ref.push(push)
    got = client.lookup({"sec": ids}, create_missing=False)
    assert_rows_equal(got, ref.lookup({"sec": ids}, create_missing=False), "rows")


def secure_channel(address: str, ca: Path, cert: Path | None = None, key: Path | None = None):
    creds = grpc.ssl_channel_credentials(
        ca.read_bytes(),
        key.read_bytes() if key else None,
        cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, creds)


# ---- bearer token -------------------------------------------------------------------------


def test_bearer_token(ps_group: ShardGroup) -> None:
    cluster = ps_group.start(1, "--auth-token", TOKEN, security=Security(auth_token=TOKEN))
    addr = cluster.addresses[0]
    with grpc.insecure_channel(addr) as ch:
        stub = ps_pb2_grpc.ParameterServerStub(ch)
        get_map = stub.GetShardMap
        req = ps_pb2.GetShardMapRequest()
        assert code_of(get_map, req, timeout=30) == C.UNAUTHENTICATED
        for md in (
            (("authorization", "Bearer wrong"),),
            (("authorization", TOKEN),),  # no "Bearer " scheme
            (("authorization", f"Bearer {TOKEN}x"),),
            (("x-token", f"Bearer {TOKEN}"),),
        ):
            assert code_of(get_map, req, timeout=30, metadata=md) == C.UNAUTHENTICATED, md
        good = (("authorization", f"Bearer {TOKEN}"),)
        assert get_map(req, timeout=30, metadata=good).epoch == 1
        # Health and reflection need no token (load balancers and grpcurl).
        assert health(ch) == health_pb2.HealthCheckResponse.SERVING
        assert health(ch, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert SERVICE in reflected_services(ch)

    for token in (None, "wrong"):
        config = ClientConfig(auth_token=token, max_retries=2)
        with pytest.raises(E.UnauthenticatedError):
            PSClient([addr], config)  # fetching the map is refused
        with PSClient(cluster.shard_map, config) as client:
            with pytest.raises(E.UnauthenticatedError):
                client.create_table(CFG)
            with pytest.raises(E.UnauthenticatedError):
                client.lookup({"sec": np.arange(3)})
    with PSClient([addr], ClientConfig(auth_token=TOKEN)) as client:
        train_and_check(client)
        ids = np.arange(5)
        before = client.lookup({"sec": ids}, create_missing=False)["sec"]
        intruder = PSClient(cluster.shard_map, ClientConfig(auth_token="wrong"))
        with intruder, pytest.raises(E.UnauthenticatedError):
            intruder.push({"sec": (ids, np.ones((5, 4), np.float32))})
        after = client.lookup({"sec": ids}, create_missing=False)["sec"]
        np.testing.assert_array_equal(after, before)


# ---- TLS ----------------------------------------------------------------------------------


def test_tls(ps_group: ShardGroup, certs: Certs) -> None:
    cluster: Cluster = ps_group.start(
        1,
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        security=Security(ca_file=str(certs.ca)),
    )
    addr = cluster.addresses[0]
    tls = TlsConfig(ca_file=str(certs.ca))
    with PSClient([addr], ClientConfig(tls=tls)) as client:
        train_and_check(client)
    # The certificate names localhost too.
    with secure_channel(f"localhost:{cluster.shards[0].port}", certs.ca) as ch:
        assert health(ch) == health_pb2.HealthCheckResponse.SERVING
        assert health(ch, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert SERVICE in reflected_services(ch)
    # Plaintext against a TLS port, or a server certificate from an unknown CA: UNAVAILABLE.
    req = ps_pb2.GetShardMapRequest()
    with grpc.insecure_channel(addr) as ch:
        stub = ps_pb2_grpc.ParameterServerStub(ch)
        assert code_of(stub.GetShardMap, req, timeout=30) == C.UNAVAILABLE
    with secure_channel(addr, certs.other_ca) as ch:
        stub = ps_pb2_grpc.ParameterServerStub(ch)
        assert code_of(stub.GetShardMap, req, timeout=30) == C.UNAVAILABLE
    with pytest.raises(E.ShardUnavailableError):
        PSClient([addr], ClientConfig())
    config = ClientConfig(max_retries=1, backoff_initial_s=0.01)
    insecure = PSClient(cluster.shard_map, config)
    with insecure, pytest.raises(E.ShardUnavailableError):
        insecure.lookup({"sec": np.arange(3)})


def test_mutual_tls(ps_group: ShardGroup, certs: Certs) -> None:
    cluster = ps_group.start(
        1,
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        "--tls-client-ca",
        str(certs.ca),
        security=Security(
            ca_file=str(certs.ca), cert_file=str(certs.client_cert), key_file=str(certs.client_key)
        ),
    )
    addr = cluster.addresses[0]
    mtls = TlsConfig(
        ca_file=str(certs.ca), cert_file=str(certs.client_cert), key_file=str(certs.client_key)
    )
    with PSClient([addr], ClientConfig(tls=mtls)) as client:
        train_and_check(client)
    req = ps_pb2.GetShardMapRequest()
    for cert, key in ((None, None), (certs.other_client_cert, certs.other_client_key)):
        with secure_channel(addr, certs.ca, cert, key) as ch:
            stub = ps_pb2_grpc.ParameterServerStub(ch)
            assert code_of(stub.GetShardMap, req, timeout=30) == C.UNAVAILABLE, cert
    with pytest.raises(E.ShardUnavailableError):
        PSClient([addr], ClientConfig(tls=TlsConfig(ca_file=str(certs.ca))))
