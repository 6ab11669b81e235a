"""TLS: ``--object tls-creds-x509,...,endpoint=server --tls-creds ID`` with certificates from openssl,
checked with nbdinfo (nbds://) and qemu-io, and against qemu-nbd given the same credentials."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from .conftest import child_env, free_port, qcowpy_argv, run, tool, wait_for_port

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, laid out as QEMU's
    x509 credentials directories (srv/, cli/) and one with only the CA (anon/)."""
    d = tmp_path_factory.mktemp("tls")
    openssl = tool("openssl")

    def ossl(*args):
        run(openssl, *args, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days",
         "2", "-subj", "/CN=qcowpy test CA")
    for who, usage, subject in (("server", "serverAuth", "/CN=localhost"), ("client", "clientAuth", "/CN=localhost"),
                                ("laptop", "clientAuth", "/C=GB/O=Example, Inc/CN=laptop")):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", "-subj",
             subject)
        (d / f"{who}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                      f"keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n")
        ossl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
             "-out", f"{who}-cert.pem", "-days", "2", "-extfile", f"{who}.ext")
    for sub, files in (("srv", ("ca-cert.pem", "server-cert.pem", "server-key.pem")),
                       ("cli", ("ca-cert.pem", "client-cert.pem", "client-key.pem")), ("anon", ("ca-cert.pem",)),
                       ("laptop", ("ca-cert.pem", "laptop-cert.pem", "laptop-key.pem"))):
        (d / sub).mkdir()
        for f in files:
            (d / sub / f.replace("laptop-", "client-")).write_bytes((d / f).read_bytes())
    return d


@pytest.fixture
def tls_server(qemu, tmp_path, certs):
    procs = []

    def start(kind: str, *extra: str, options: tuple[str, ...] = ()) -> int:
        img = tmp_path / f"{kind}.qcow2"
        qemu.create(img, "16M")
        qemu.io(img, "write -P 0x2c 0 1M")
        port = free_port()
        opts = ["-t", "-b", "127.0.0.1", "-p", str(port), "--object",
                f"tls-creds-x509,id=tls0,dir={certs / 'srv'},endpoint=server{''.join(extra)}", "--tls-creds", "tls0",
                *options]
        argv = qcowpy_argv("nbd", *opts, img) if kind == "qcowpy" else [tool("qemu-nbd"), *opts, str(img)]
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=child_env())
        procs.append(proc)
        wait_for_port(port, proc)
        return port

    start.procs = procs  # type: ignore[attr-defined]
    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
        p.communicate(timeout=20)


def _nbdinfo(port: int, certdir, tls: bool = True) -> subprocess.CompletedProcess:
    uri = f"nbds://localhost:{port}/?tls-certificates={certdir}" if tls else f"nbd://localhost:{port}/"
    return run(tool("nbdinfo"), "--json", uri, check=False)


def _tls_view(port: int, certs) -> list:
    """[nbdinfo --json over TLS less the URIs, the error a client without TLS gets]."""
    p = _nbdinfo(port, certs / "cli")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    for e in info["exports"]:
        e.pop("uri")
    plain = _nbdinfo(port, None, tls=False)  # a client without TLS is refused the export
    assert plain.returncode != 0
    return [info, plain.stderr.split(": ", 1)[1]]


def test_tls_clients_see_what_qemu_nbd_shows(tls_server, certs):
    ours, theirs = tls_server("qcowpy"), tls_server("qemu-nbd")
    results = []
    for port in (ours, theirs):
        results += _tls_view(port, certs)
        nocert = _nbdinfo(port, certs / "anon")  # verify-peer (the default) wants a client certificate
        assert nocert.returncode != 0
    assert results[0]["TLS"] is True
    assert results[0] == results[2] and results[1] == results[3]


def test_qemu_io_over_tls(tls_server, certs):
    port = tls_server("qcowpy")
    opts = f"driver=nbd,server.type=inet,server.host=localhost,server.port={port},tls-creds=tls0"
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs / 'cli'}"
    p = run(tool("qemu-io"), "--object", obj, "--image-opts", opts, "-c", "read -P 0x2c 0 1M", "-c",
            "write -P 0x3d 2M 64k", "-c", "read -P 0x3d 2M 64k")
    assert "read 65536/65536" in p.stdout and "error" not in p.stdout.lower()


def test_verify_peer_off_accepts_a_client_without_certificate(tls_server, certs):
    port = tls_server("qcowpy", ",verify-peer=off")
    p = _nbdinfo(port, certs / "anon")
    assert p.returncode == 0 and json.loads(p.stdout)["TLS"] is True


@pytest.mark.parametrize("identity,allowed", [("C=GB,,O=Example\\,, Inc,,CN=laptop", True), ("CN=laptop", False),
                                               (None, False)])
def test_tls_authz_like_qemu_nbd(tls_server, certs, identity, allowed):
    """--tls-authz with an authz-simple identity (commas doubled, as QEMU parses --object): the client's
    certificate DN must match; a missing authz object refuses everyone. The same for both servers."""
    objects = ("--object", f"authz-simple,id=auth0,identity={identity}") if identity else ()
    denials = []
    for kind in ("qcowpy", "qemu-nbd"):
        port = tls_server(kind, options=(*objects, "--tls-authz", "auth0"))
        p = _nbdinfo(port, certs / "laptop")
        assert (p.returncode == 0) == allowed, (kind, p.stderr)
        proc = tls_server.procs[-1]
        proc.terminate()
        denials.append([re.sub(r"^\S*(qemu-nbd|qcowpy): ", "", ln) for ln in proc.communicate(timeout=20)[1].splitlines()
                        if "authz" in ln.lower()])  # (qemu-nbd also reports the readiness probe)
    assert denials[0] == denials[1] and bool(denials[0]) != allowed


@pytest.mark.parametrize("objects,creds,message", [
    ([], "tls0", "Failed to get TLS creds: No TLS credentials with id 'tls0'"),
    (["tls-creds-x509,id=tls0,dir=/nonexist,endpoint=server"], "tls0",
     "Unable to access credentials /nonexist/ca-cert.pem: No such file or directory"),
    (["foo,id=tls0"], "tls0", "Parameter 'qom-type' does not accept value 'foo'"),
])
def test_tls_option_errors_match_qemu_nbd(tmp_path, objects, creds, message):
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(1 << 20))
    args = [a for o in objects for a in ("--object", o)] + ["--tls-creds", creds, "-k", str(tmp_path / "s"), str(img)]
    ours = subprocess.run(qcowpy_argv("nbd", *args), capture_output=True, text=True, env=child_env(), timeout=30)
    theirs = run(tool("qemu-nbd"), *args, check=False, timeout=30)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr == f"qcowpy: {message}\n"
    assert theirs.stderr.endswith(f"qemu-nbd: {message}\n")


@pytest.mark.parametrize("server", ["qcowpy", "qemu-nbd"])
def test_qcowpy_client_over_tls(tls_server, certs, tmp_path, server):
    """nbds://...?tls-certificates=DIR in qcowpy's client, against both servers."""
    port = tls_server(server)
    uri = f"nbds://localhost:{port}/?tls-certificates={certs / 'cli'}"
    p = run(*qcowpy_argv("map", "--output=json", uri), env=child_env())
    assert json.loads(p.stdout)[0]["data"] is True
    out = tmp_path / "copy.raw"
    run(*qcowpy_argv("convert", "-O", "raw", uri, str(out)), env=child_env())
    assert out.read_bytes()[: 1 << 20] == b"\x2c" * (1 << 20) and out.stat().st_size == 16 << 20
    plain = run(*qcowpy_argv("info", f"nbd://localhost:{port}/"), env=child_env(), check=False)
    assert plain.returncode == 1 and "Requested export not available" in plain.stderr
    anon = run(*qcowpy_argv("info", f"nbds://localhost:{port}/?tls-certificates={certs / 'anon'}"),
               env=child_env(), check=False)
    assert anon.returncode == 1 and "Traceback" not in anon.stderr


@pytest.mark.parametrize("hostname", [(), ("--tls-hostname", "localhost")], ids=["bind-address", "tls-hostname"])
def test_list_over_tls_like_qemu_nbd(tls_server, certs, hostname):
    port = tls_server("qcowpy")
    creds = ["--object", f"tls-creds-x509,id=c0,dir={certs / 'cli'},endpoint=client", "--tls-creds", "c0"]
    where = ["-b", "127.0.0.1" if not hostname else "localhost", "-p", str(port)]
    ours = subprocess.run(qcowpy_argv("nbd", "-L", *where, *creds, *hostname), capture_output=True, text=True,
                          env=child_env(), timeout=60)
    theirs = run(tool("qemu-nbd"), "-L", *where, *creds, *hostname, check=False, timeout=60)
    assert ours.returncode == theirs.returncode == 0, (ours.stderr, theirs.stderr)
    assert ours.stdout == theirs.stdout and "export: ''" in ours.stdout


def test_storage_daemon_nbd_server_with_tls_like_qsd(qemu, certs, tmp_path):
    """--object tls-creds-x509 + --nbd-server ...,tls-creds=ID: TLS clients get the export, others not."""
    import sys
    results = []
    for kind in ("qsd", "ours"):
        img = tmp_path / f"{kind}.qcow2"
        qemu.create(img, "16M")
        port = free_port()
        args = ["--object", f"tls-creds-x509,id=tls0,dir={certs / 'srv'},endpoint=server",
                "--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0",
                "--export", "type=nbd,id=e,node-name=n,name="]
        argv = ["qemu-storage-daemon", *args] if kind == "qsd" else \
            [sys.executable, "-m", "qcowpy.cli.main", "storage-daemon", *args]
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=child_env())
        try:
            wait_for_port(port, proc)
            results += _tls_view(port, certs)
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
        assert proc.returncode == 0
        qemu.assert_clean(img)
    assert results[0]["TLS"] is True
    assert results[0] == results[2] and results[1] == results[3]
