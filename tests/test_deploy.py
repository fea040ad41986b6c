"""Deployment helpers, checked against Flower's own parsers (fast; the end-to-end run over
TLS is tests/test_deployment.py, marked slow)."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedsynth.clients.node import NodeConfig
from fedsynth.deploy.certificates import (
    CertificateError,
    ServerCertificates,
    create_node_key,
    create_server_certificates,
    subject_alt_names,
)
from fedsynth.deploy.cli import deploy_app
from fedsynth.deploy.launch import (
    node_config_string,
    superlink_command,
    supernode_command,
    write_connection,
)
from tests.factories import FEDERATIONS


def test_the_server_certificate_is_signed_by_the_ca_and_names_every_host(tmp_path):
    certs = create_server_certificates(tmp_path, ["fl.example.org", "203.0.113.7"], days=30)
    assert certs.created_ca
    assert subject_alt_names(certs.server_cert.read_bytes()) == [
        "fl.example.org",
        "localhost",
        "203.0.113.7",
        "127.0.0.1",
    ]
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 30 <= days <= 31
    for key in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ip = ipaddress.ip_address("127.0.0.1")
    assert ip in server.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.IPAddress)


def test_a_second_run_reuses_the_ca_and_reissues_only_the_server_certificate(tmp_path):
    first = create_server_certificates(tmp_path, ["a.example.org"])
    ca_pem = first.ca_cert.read_bytes()
    second = create_server_certificates(tmp_path, ["b.example.org"])
    assert not second.created_ca and second.ca_cert.read_bytes() == ca_pem
    ca = x509.load_pem_x509_certificate(ca_pem)
    x509.load_pem_x509_certificate(second.server_cert.read_bytes()).verify_directly_issued_by(ca)
    assert ServerCertificates.in_folder(tmp_path).hosts[0] == "b.example.org"


def test_bad_hosts_and_a_ca_without_its_key_are_refused(tmp_path):
    for bad in ("bad host", "https://fl.example.org", "fl.example.org:9092"):
        with pytest.raises(CertificateError, match="--host"):
            create_server_certificates(tmp_path / "x", [bad])
    certs = create_server_certificates(tmp_path / "y")
    certs.ca_key.unlink()
    with pytest.raises(CertificateError, match="ca.key"):
        create_server_certificates(tmp_path / "y")
    with pytest.raises(CertificateError, match="missing"):
        ServerCertificates.in_folder(tmp_path / "empty")


def test_node_keys_are_openssh_p384_private_0600_and_never_silently_replaced(tmp_path):
    key = create_node_key(tmp_path, "bank-a")
    assert stat.S_IMODE(key.private_key.stat().st_mode) == 0o600
    private = serialization.load_ssh_private_key(key.private_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(key.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1" and public == private.public_key()
    # Flower's own loader for `flwr supernode register` accepts it.
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(key.public_key)
    with pytest.raises(CertificateError, match="exists"):
        create_node_key(tmp_path, "bank-a")
    assert create_node_key(tmp_path, "bank-a", overwrite=True).private_key.exists()


def test_node_config_survives_flowers_parser_even_with_spaces_and_backslashes():
    from flwr.common.config import parse_config_args

    config = {
        "institution": "Bank of A",
        "data-path": r"C:\data\bank a.csv",
        "ledger-path": "/srv/node/ledger.json",
        "outbox-path": "/srv/node/outbox.jsonl",
        "epsilon-cap": 3.0,
        "own-noise-cap": 5.0,
    }
    assert parse_config_args([node_config_string(config)]) == config
    node = NodeConfig.from_mapping(config, "node config")
    assert (node.epsilon_cap, node.own_noise_cap) == (3.0, 5.0)
    del config["own-noise-cap"]  # unset: no server may learn more than the cap
    assert NodeConfig.from_mapping(config, "node config").own_noise_cap == 3.0
    with pytest.raises(ValueError, match="may not contain"):
        node_config_string({"institution": "O'Brien clinic"})


def test_commands_use_tls_and_node_auth_unless_told_otherwise(tmp_path):
    certs = create_server_certificates(tmp_path)
    link = superlink_command(certs, port=9092)
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-certfile") + 1] == str(certs.server_cert)
    with pytest.raises(ValueError, match="TLS"):
        superlink_command(None)
    node = supernode_command(
        "fl.example.org:9092", {"institution": "a"}, root_certificates=certs.ca_cert
    )
    assert node[node.index("--root-certificates") + 1] == str(certs.ca_cert)
    assert "--insecure" not in node
    with pytest.raises(ValueError, match="TLS"):
        supernode_command("x:1", {}, root_certificates=None, private_key=tmp_path / "k")


def test_flwr_reads_the_connection_we_write(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    certs = create_server_certificates(tmp_path / "certs")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    path = write_connection("fedsynth", "fl.example.org:9092", certs.ca_cert)
    assert path == tmp_path / "flwr" / "config.toml"
    write_connection("other", "127.0.0.1:1", None)  # keeps the first, default unchanged
    conn = read_superlink_connection("fedsynth")
    assert conn.address == "fl.example.org:9092" and not conn.insecure
    assert conn.root_certificates == str(certs.ca_cert.resolve())
    assert read_superlink_connection(None).name == "fedsynth"
    assert read_superlink_connection("other").insecure


def test_node_join_refuses_bad_inputs_before_starting_anything(tmp_path):
    runner = CliRunner()
    data = tmp_path / "bank.csv"
    data.write_text("default,student,balance,income\nNo,No,10.0,100.0\n")
    ca = create_server_certificates(tmp_path / "certs").ca_cert
    base = ["node-join", "--superlink", "127.0.0.1:1", "--ledger", str(tmp_path / "l.json")]
    cases = {
        "--root-cert is required": ["--data", str(data), "--cap", "1", "--institution", "a"],
        "no such file": [
            "--data",
            str(tmp_path / "none.csv"),
            "--cap",
            "1",
            "--institution",
            "a",
            "--root-cert",
            str(ca),
        ],
        "epsilon-cap must be > 0": [
            "--data",
            str(data),
            "--cap",
            "0",
            "--institution",
            "a",
            "--root-cert",
            str(ca),
        ],
        "cannot be combined": [
            "--data",
            str(data),
            "--cap",
            "1",
            "--institution",
            "a",
            "--root-cert",
            str(ca),
            "--insecure",
        ],
        "own-noise-cap must be at least epsilon-cap (2)": [
            "--data",
            str(data),
            "--cap",
            "2",
            "--own-noise-cap",
            "1.5",
            "--institution",
            "a",
            "--root-cert",
            str(ca),
        ],
        "--poll-s must be 0": [
            "--data",
            str(data),
            "--cap",
            "1",
            "--institution",
            "a",
            "--root-cert",
            str(ca),
            "--poll-s",
            "0.01",
        ],
    }
    for message, args in cases.items():
        result = runner.invoke(deploy_app, [*base, *args])
        assert result.exit_code == 2, (message, result.output)
        assert message in " ".join(result.output.split()), result.output


def test_node_join_checks_the_table_against_the_spec(tmp_path):
    data = tmp_path / "bank.csv"
    data.write_text("default,student,balance,income\nMaybe,No,10.0,100.0\n")
    ca = create_server_certificates(tmp_path / "certs").ca_cert
    args = ["--superlink", "127.0.0.1:1", "--ledger", str(tmp_path / "l.json")]
    args += ["--data", str(data), "--cap", "1", "--institution", "a", "--root-cert", str(ca)]
    args += ["--spec", str(FEDERATIONS / "bank.toml")]
    # In a subprocess: on success node-join would become flower-supernode.
    done = subprocess.run(
        [sys.executable, "-m", "fedsynth.deploy", "node-join", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "default" in done.stderr and "Maybe" in done.stderr


def test_server_start_keeps_the_superlink_state_in_a_file_unless_told_in_memory(
    tmp_path, monkeypatch
):
    from fedsynth.deploy import cli as deploy_cli

    certs = create_server_certificates(tmp_path / "certs")
    started: list[list[str]] = []

    def record(cmd, env):
        started.append(cmd)
        raise SystemExit(0)

    monkeypatch.setattr(deploy_cli, "_exec", record)
    base = ["server-start", "--certs", str(certs.folder), "--state", str(tmp_path / "state")]
    for extra in ([], ["--in-memory"]):
        result = CliRunner().invoke(deploy_cli.deploy_app, [*base, *extra])
        assert result.exit_code == 0, result.output
    on_disk, in_memory = started
    assert on_disk[on_disk.index("--database") + 1] == str(tmp_path / "state" / "superlink.db")
    assert "--database" not in in_memory
