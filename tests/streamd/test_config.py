"""Config: defaults, precedence file < env < CLI, and fail-fast errors naming the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from streamd.config import Config, load_config
from streamd.errors import ConfigError
from streamd.serve_args import add_arguments, config_from_args

REPO = Path(__file__).resolve().parents[2]


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_and_example_file_agree() -> None:
    default = load_config(environ={})
    example = load_config(REPO / "streamd.example.toml", environ={})
    assert example == default
    assert default.server.host == "127.0.0.1" and default.server.port == 8765
    assert default.recognition.pipeline == "whisper" and not default.mqtt.enabled
    with pytest.raises(AttributeError):
        default.server.port = 1  # type: ignore[misc]  # frozen


def test_max_sessions_defaults_to_the_measured_capacity(monkeypatch) -> None:
    """4 sessions per available core (streamd/config.py names the measurement), 4..256;
    an explicit value wins."""
    from streamd import config as config_module

    for cores, expected in ((1, 4), (2, 8), (6, 24), (200, 256)):
        monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda _pid, n=cores:
                            set(range(n)))
        assert load_config(environ={}).server.max_sessions == expected
    assert load_config(environ={"STREAMD_SERVER_MAX_SESSIONS": "3"}).server.max_sessions == 3


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('node = "filenode"\n[server]\nport = 9001\nmax_sessions = 3\n'
                    '[mqtt]\nhost = "broker"\n[vad]\naggressiveness = 1\n')
    env = {"STREAMD_SERVER_PORT": "9002", "STREAMD_VAD_AGGRESSIVENESS": "3",
           "STREAMD_RECOGNITION_BATCH_SIZES": "1,2,16", "STREAMD_MQTT_PORT": "1884",
           "STREAMD_SHARED_AUDIO": "/ignored", "STREAMD_NODE": "envnode"}
    cfg = config_from_args(cli("--config", str(path), "--port", "9003", "--mqtt-prefix", "x/y",
                               "--token", "a", "--token", "b", "--mic", "--pipeline", "ctc",
                               "--workers", "3", "--final-model", "tiny.en"),
                           env)
    assert cfg.server.port == 9003  # CLI beats env beats file
    assert cfg.server.max_sessions == 3  # file only
    assert cfg.vad.aggressiveness == 3  # env beats file
    assert cfg.node == "envnode"
    assert cfg.recognition.batch_sizes == (1, 2, 16)
    assert cfg.mqtt.host == "broker" and cfg.mqtt.port == 1884 and cfg.mqtt.prefix == "x/y"
    assert cfg.server.tokens == ("a", "b")
    assert cfg.mic.enabled and cfg.mic.device == ""
    assert cfg.recognition.pipeline == "ctc"
    assert cfg.recognition.workers == 3 and cfg.recognition.final_model == "tiny.en"
    limits = config_from_args(cli("--allowed-origin", "https://a.example", "--allowed-origin",
                                  "http://b:8080", "--connection-rate", "0",
                                  "--idle-timeout", "5"),
                              {"STREAMD_SERVER_ALLOWED_ORIGINS": "https://env.example",
                               "STREAMD_SERVER_SEND_TIMEOUT_S": "3"})
    assert limits.server.allowed_origins == ("https://a.example", "http://b:8080")
    assert limits.server.connection_rate == 0 and limits.server.idle_timeout_s == 5
    assert limits.server.send_timeout_s == 3
    env_only = config_from_args(cli(), {"STREAMD_SERVER_ALLOWED_ORIGINS": "https://x,https://y"})
    assert env_only.server.allowed_origins == ("https://x", "https://y")
    named = config_from_args(cli("--mic", "hw:1", "--node", "n2"), {})
    assert named.mic.device == "hw:1" and named.node == "n2"


@pytest.mark.parametrize("toml,env,key", [
    ("[vad]\naggressiveness = 4\n", {}, "vad.aggressiveness"),
    ("[vad]\nframe_ms = 25\n", {}, "vad.frame_ms"),
    ("[server]\nport = \"eighty\"\n", {}, "server.port"),
    ("[server]\nallowed_origins = [\"app.example\"]\n", {}, "server.allowed_origins"),
    ("", {"STREAMD_SERVER_CONNECTION_RATE": "-1"}, "server.connection_rate"),
    ("[server]\nhandshake_timeout_s = 0\n", {}, "server.handshake_timeout_s"),
    ("[server]\nsend_buffer_bytes = 100\n", {}, "server.send_buffer_bytes"),
    ("[server]\nprot = 1\n", {}, "server.prot"),
    ("[serve]\nport = 1\n", {}, "serve"),
    ("server = 3\n", {}, "server"),
    ("[server]\nhost = \"0.0.0.0\"\n", {}, "server.host"),
    ("[recognition]\npipeline = \"magic\"\n", {}, "recognition.pipeline"),
    ("[recognition]\nbatch_sizes = [4, 2]\n", {}, "recognition.batch_sizes"),
    ("[recognition]\nworkers = 0\n", {}, "recognition.workers"),
    ("[mqtt]\nprefix = \"a/#\"\n", {}, "mqtt.prefix"),
    ("[mqtt]\nhosts = [\"b1:99999\"]\n", {}, "mqtt.hosts"),
    ("[server]\ndrain_timeout_s = -1\n", {}, "server.drain_timeout_s"),
    ("", {"STREAMD_MQTT_HOSTS": "b1:1883,b2:x"}, "mqtt.hosts"),
    ("node = \"has space\"\n", {}, "node"),
    ("", {"STREAMD_SERVER_MAX_SESSIONS": "lots"}, "server.max_sessions"),
    ("[server]\nport = 9000\nagent_port = 9000\n", {}, "server.agent_port"),
    ("", {"STREAMD_MIC_ENABLED": "maybe"}, "mic.enabled"),
    ("[server\n", {}, "--config"),
])
def test_bad_values_name_the_key(tmp_path: Path, toml: str, env: dict, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env)
    assert info.value.key == key
    assert repr(key) in str(info.value)


def test_remote_host_allowed_with_token_or_explicit_opt_in() -> None:
    assert load_config(environ={}, overrides={"server": {"host": "0.0.0.0",
                                                         "tokens": ["t"]}}).server.tokens
    assert load_config(environ={}, overrides={"server": {"host": "::",
                                                         "allow_insecure": True}})
    with pytest.raises(ConfigError, match="--config"):
        load_config("/nonexistent/streamd.toml", {})


def test_config_is_one_frozen_object() -> None:
    cfg = Config()
    assert hash(cfg.server) == hash(Config().server)


def test_engine_workers_come_from_the_config() -> None:
    from streamd.daemon import Daemon

    cfg = config_from_args(cli("--workers", "1"), {})
    assert Daemon(cfg).engine.workers == 1
    assert Daemon(load_config(None, {})).engine.workers == 2


def test_several_mqtt_brokers_file_env_flag(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[mqtt]\nhosts = ["n1:4001", "n2", "[::1]:4003"]\nport = 4000\n')
    cfg = load_config(path, {})
    assert cfg.mqtt.enabled and cfg.mqtt.host == ""
    assert cfg.mqtt.brokers == (("n1", 4001), ("n2", 4000), ("::1", 4003))
    env = load_config(None, {"STREAMD_MQTT_HOSTS": "a:1,b:2"})
    assert env.mqtt.hosts == ("a:1", "b:2")
    both = config_from_args(cli("--mqtt-host", "h", "--mqtt-hosts", "a:1,h:1883"), {})
    # host:port first, then the list, without repeats
    assert both.mqtt.brokers == (("h", 1883), ("a", 1))
    single = load_config(None, {"STREAMD_MQTT_HOST": "x"}).mqtt
    assert single.brokers == (("x", 1883),)


def test_secret_values_not_in_errors(tmp_path: Path) -> None:
    for text, key in (("[server]\ntokens = [987654321]\n", "server.tokens"),
                      ("[mqtt]\npassword = 987654321\n", "mqtt.password")):
        path = tmp_path / "secret.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(path, environ={})
        assert key in str(err.value) and "987654321" not in str(err.value)


def test_mqtt_tls_client_id_and_credentials_from_file_env_and_flags(tmp_path: Path) -> None:
    """Every MQTT connection setting reaches the publisher by all three paths (they once
    fell on the floor: the reader asked for fields the config lacked)."""
    from streamd.mqtt import MqttPublisher

    ca, cert, key, pw = (tmp_path / n for n in ("ca.pem", "c.pem", "c.key", "pw"))
    for f in (ca, cert, key):
        f.write_text("-----BEGIN CERTIFICATE-----\n")
    pw.write_text("from-file\nignored second line\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[mqtt]\nhost = "broker"\nport = 8883\ntls = true\n'
                    f'tls_ca_file = "{ca}"\nclient_id = "kitchen-asr"\nusername = "u"\n'
                    f'password_file = "{pw}"\ntls_insecure = true\n')
    s = load_config(path, {}).mqtt
    assert (s.host, s.port, s.tls, s.tls_ca_file, s.tls_insecure) == (
        "broker", 8883, True, str(ca), True)
    assert (s.client_id, s.username, s.read_password()) == ("kitchen-asr", "u", "from-file")
    assert s.tls_cert_file == "" and s.keepalive_s == 30 and s.outbox_size == 1000
    pub = MqttPublisher(s, "n")
    assert pub.client_id == "kitchen-asr" and pub._password == "from-file"
    assert pub.broker == ("broker", 8883)

    env = {"STREAMD_MQTT_HOST": "b2", "STREAMD_MQTT_TLS": "yes",
           "STREAMD_MQTT_TLS_CA_FILE": str(ca), "STREAMD_MQTT_TLS_CERT_FILE": str(cert),
           "STREAMD_MQTT_TLS_KEY_FILE": str(key), "STREAMD_MQTT_CLIENT_ID": "env-id",
           "STREAMD_MQTT_USERNAME": "eu", "STREAMD_MQTT_PASSWORD": "env-secret"}
    s = load_config(None, env).mqtt
    assert (s.tls, s.tls_ca_file, s.tls_cert_file, s.tls_key_file) == (
        True, str(ca), str(cert), str(key))
    assert (s.client_id, s.username, s.read_password()) == ("env-id", "eu", "env-secret")

    # Flags beat env; a password file named by a flag beats STREAMD_MQTT_PASSWORD.
    cfg = config_from_args(cli("--mqtt-host", "b3", "--mqtt-tls", "--mqtt-ca", str(ca),
                               "--mqtt-cert", str(cert), "--mqtt-key", str(key),
                               "--mqtt-client-id", "flag-id", "--mqtt-username", "fu",
                               "--mqtt-password-file", str(pw)), env)
    s = cfg.mqtt
    assert (s.host, s.tls, s.tls_cert_file, s.client_id, s.username, s.read_password()) == (
        "b3", True, str(cert), "flag-id", "fu", "from-file")
    plain = MqttPublisher(config_from_args(cli("--mqtt-host", "b"), {}).mqtt, "n")
    assert not plain.config.tls and plain.client_id.startswith("streamd-n-")
    assert plain._password is None


@pytest.mark.parametrize("mqtt,key", [
    ({"tls_ca_file": "{ca}"}, "mqtt.tls_ca_file"),  # without tls
    ({"tls": True, "tls_ca_file": "{missing}"}, "mqtt.tls_ca_file"),
    ({"tls": True, "tls_cert_file": "{missing}"}, "mqtt.tls_cert_file"),
    ({"tls": True, "tls_key_file": "{ca}"}, "mqtt.tls_key_file"),  # without a certificate
    ({"password": "p", "password_file": "{ca}"}, "mqtt.password_file"),
    ({"password_file": "{missing}"}, "mqtt.password_file"),
    ({"client_id": "bad\nid"}, "mqtt.client_id"),
])
def test_bad_mqtt_connection_settings_name_the_key(tmp_path: Path, mqtt: dict, key: str) -> None:
    (tmp_path / "ca.pem").write_text("x")
    paths = {"ca": tmp_path / "ca.pem", "missing": tmp_path / "nope.pem"}
    mqtt = {k: v.format(**paths) if isinstance(v, str) else v for k, v in mqtt.items()}
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides={"mqtt": {"host": "broker", **mqtt}})
    assert info.value.key == key
