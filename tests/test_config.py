"""Configuration parsing: sizes, durations, flags vs environment, one-line errors."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, env_name, is_loopback, parse_duration, parse_serve_args, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [("8MiB", 8 * 1024**2), ("5MB", 5_000_000), ("1048576", 1048576), ("1gib", 1024**3), ("2 KiB", 2048),
     ("0.5MiB", 512 * 1024), ("100b", 100)],
)
def test_sizes_parse_with_binary_and_decimal_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "8 parsecs", "-1", "1.3b"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    "text,expected", [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("20", 20.0), ("1.5s", 1.5)]
)
def test_durations_parse(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


def test_defaults_match_api_md() -> None:
    cfg = parse_serve_args([], environ={})
    assert (cfg.host, cfg.port, cfg.store) == ("127.0.0.1", 8080, "./chunkgate-data")
    assert cfg.chunk_size == 8 * 1024**2 and cfg.cache_size == 256 * 1024**2
    assert (cfg.lock_stale_after, cfg.lock_timeout) == (30.0, 20.0)
    assert (cfg.size_tolerance_bytes, cfg.size_tolerance_ratio) == (2048, 0.001)
    assert cfg.auth_token == [] and cfg.signing_key is None and cfg.allow_anonymous_writes is False


def test_every_flag_reads_its_environment_variable_and_flags_win() -> None:
    env = {"CHUNKGATE_CHUNK_SIZE": "5MB", "CHUNKGATE_LOCK_TIMEOUT": "3s", "CHUNKGATE_PORT": "9000",
           "CHUNKGATE_AUTH_TOKEN": "a,b", "CHUNKGATE_SIZE_TOLERANCE_RATIO": "0"}
    cfg = parse_serve_args(["--port", "9001"], environ=env)
    assert cfg.chunk_size == 5_000_000 and cfg.lock_timeout == 3.0 and cfg.port == 9001
    assert cfg.auth_token == ["a", "b"] and cfg.size_tolerance_ratio == 0.0
    assert env_name("--size-tolerance-bytes") == "CHUNKGATE_SIZE_TOLERANCE_BYTES"


def test_aws_endpoint_url_is_the_fallback_for_the_s3_endpoint() -> None:
    cfg = parse_serve_args([], environ={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert cfg.s3_endpoint_url == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    "argv,flag",
    [(["--chunk-size", "lots"], "--chunk-size"), (["--port", "99999"], "--port"), (["--lock-timeout", "0"], "--lock-timeout"),
     (["--size-tolerance-ratio", "2"], "--size-tolerance-ratio"), (["--host", "0.0.0.0"], "--host"),
     (["--verify-reads", "md5"], "--verify-reads"), (["--active-content", "none"], "--active-content")],
)
def test_bad_settings_raise_an_error_naming_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_serve_args(argv, environ={})
    assert str(info.value).startswith(flag)
    assert "\n" not in str(info.value)


def test_a_public_host_is_allowed_with_tokens_or_explicit_anonymous_writes() -> None:
    assert parse_serve_args(["--host", "0.0.0.0", "--auth-token", "t"], environ={}).host == "0.0.0.0"
    assert parse_serve_args(["--host", "0.0.0.0", "--allow-anonymous-writes"], environ={}).allow_anonymous_writes


@pytest.mark.parametrize("host,expected", [("127.0.0.1", True), ("127.5.5.5", True), ("::1", True), ("localhost", True),
                                           ("0.0.0.0", False), ("10.0.0.1", False), ("example.org", False)])
def test_loopback_detection(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_uploads_are_sandboxed_unless_the_operator_says_otherwise() -> None:
    assert parse_serve_args([], environ={}).active_content == "sandbox"
    assert parse_serve_args([], environ={"CHUNKGATE_ACTIVE_CONTENT": "inline"}).active_content == "inline"
    assert parse_serve_args(["--active-content", "attachment"], environ={"CHUNKGATE_ACTIVE_CONTENT": "inline"}).active_content == "attachment"
