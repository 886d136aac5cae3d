"""Settings: defaults that work with the embedded stack, and combinations refused at start-up."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.dev import stack


def test_exactly_once_refuses_a_producer_without_idempotence() -> None:
    with pytest.raises(ValidationError, match="exactly-once needs enable_idempotence"):
        Settings(delivery="exactly-once", enable_idempotence=False)
    assert not Settings(enable_idempotence=False).enable_idempotence


def test_the_review_topic_is_a_topic_of_its_own() -> None:
    """On the verdict topic, each review verdict would be published there twice."""
    assert Settings().review_topic == "verdicts.review"
    for taken in ("verdicts", "images.dlq"):
        with pytest.raises(ValidationError, match="review_topic must differ"):
            Settings(review_topic=taken)


def test_the_embedded_stack_creates_every_topic_the_default_settings_name() -> None:
    defaults = Settings()
    assert (
        defaults.input_topic,
        defaults.verdict_topic,
        defaults.dead_letter_topic,
        defaults.review_topic,
        defaults.banks_topic,
        defaults.decisions_topic,
    ) == stack.DEFAULT_TOPICS
    assert {defaults.banks_topic, defaults.decisions_topic} == stack.COMPACTED_TOPICS


def test_settings_come_from_guardstream_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDSTREAM_DELIVERY", "exactly-once")
    monkeypatch.setenv("GUARDSTREAM_MAX_IN_FLIGHT", "7")
    settings = Settings()
    assert (settings.delivery, settings.max_in_flight) == ("exactly-once", 7)
    monkeypatch.setenv("GUARDSTREAM_DELIVERY", "at-most-once")
    with pytest.raises(ValidationError, match="delivery"):
        Settings()


# --- Kafka security ----------------------------------------------------------------------------


def test_plaintext_connections_carry_no_security_options() -> None:
    options = Settings(bootstrap_servers="k:9092", client_id="c").kafka_connection()

    assert options == {
        "bootstrap_servers": "k:9092",
        "client_id": "c",
        "security_protocol": "PLAINTEXT",
    }


def test_sasl_needs_credentials_and_passes_them_without_echoing_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValidationError, match="needs sasl_username and sasl_password"):
        Settings(security_protocol="SASL_PLAINTEXT", sasl_username="svc")
    monkeypatch.setenv("GUARDSTREAM_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("GUARDSTREAM_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("GUARDSTREAM_SASL_USERNAME", "svc")
    monkeypatch.setenv("GUARDSTREAM_SASL_PASSWORD", "s3cret-pw")

    settings = Settings()
    options = settings.kafka_connection()

    assert (options["sasl_mechanism"], options["sasl_plain_username"]) == ("SCRAM-SHA-512", "svc")
    assert options["sasl_plain_password"] == "s3cret-pw"
    assert "ssl_context" not in options
    assert "s3cret-pw" not in repr(settings)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its key, made with openssl for this test run."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "client.crt", directory / "client.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=guardstream-test", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_builds_a_context_from_the_configured_files(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    settings = Settings(
        security_protocol="SASL_SSL",
        sasl_username="svc",
        sasl_password="pw",
        ssl_cafile=cert,
        ssl_certfile=cert,
        ssl_keyfile=key,
        ssl_check_hostname=False,
    )

    context = settings.kafka_connection()["ssl_context"]

    assert isinstance(context, ssl.SSLContext)
    assert [dict(c["subject"][0])["commonName"] for c in context.get_ca_certs()] == [
        "guardstream-test"
    ]
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_a_client_certificate_needs_its_key(certificate: tuple[Path, Path]) -> None:
    with pytest.raises(ValidationError, match="go together"):
        Settings(security_protocol="SSL", ssl_certfile=certificate[0])


def test_a_missing_ca_file_is_a_settings_error_not_a_failure_at_first_connect(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValidationError, match="ssl_cafile"):
        Settings(security_protocol="SSL", ssl_cafile=tmp_path / "absent.pem")


def test_empty_tls_file_settings_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SSL_CAFILE", "SSL_CERTFILE", "SSL_KEYFILE"):
        monkeypatch.setenv(f"GUARDSTREAM_{name}", "")

    settings = Settings(security_protocol="SSL")

    assert (settings.ssl_cafile, settings.ssl_certfile, settings.ssl_keyfile) == (None, None, None)


# --- Tenants and reloading ---------------------------------------------------------------------


def test_tenant_settings_default_to_no_tenant_file_and_a_five_second_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GUARDSTREAM_TENANT_FILE", "")  # a ConfigMap key left empty: unset
    settings = Settings()
    assert (settings.tenant_file, settings.unknown_tenant, settings.reload_interval_s) == (
        None,
        "default",
        5.0,
    )
    with pytest.raises(ValidationError, match="unknown_tenant"):
        Settings(unknown_tenant="drop")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="reload_interval_s"):
        Settings(reload_interval_s=-1)
