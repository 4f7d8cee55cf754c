"""Settings layers and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from defectscan.config import load_settings
from defectscan.errors import ConfigError
from defectscan.paths import DEFAULTS_FILE


def test_defaults_give_embedded_sqlite_under_xdg_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    settings = load_settings(environ={})
    assert settings.database_url is None
    assert settings.resolved_data_dir == tmp_path / "defectscan"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'defectscan' / 'defectscan.sqlite'}"
    assert settings.log_level == "INFO"


def test_layers_override_in_order(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("log_level: WARNING\ndatabase_url: sqlite:///from-file.sqlite\ndata_dir: /srv/defectscan\n")
    from_file = load_settings(config, environ={})
    assert (from_file.log_level, from_file.database_url) == ("WARNING", "sqlite:///from-file.sqlite")

    environ = {"DEFECTSCAN_DATABASE_URL": "sqlite:///from-env.sqlite", "DEFECTSCAN_LOG_LEVEL": "ERROR"}
    from_env = load_settings(config, environ=environ)
    assert (from_env.log_level, from_env.database_url) == ("ERROR", "sqlite:///from-env.sqlite")
    assert from_env.data_dir == Path("/srv/defectscan")

    overrides = {"database_url": ("sqlite:///from-flag.sqlite", "--database-url"), "log_level": (None, "--log-level")}
    from_flag = load_settings(config, environ=environ, overrides=overrides)
    assert from_flag.database_url == "sqlite:///from-flag.sqlite"
    assert from_flag.log_level == "ERROR"  # a flag that was not given leaves the lower layer alone


def test_environment_ignores_non_setting_variables():
    from defectscan.report.pdf import CHROMIUM_ENV

    environ = {"DEFECTSCAN_CONFIG": "x.yaml", "DEFECTSCAN_TEST_POSTGRES_URL": "postgresql://x", "PATH": "/bin", CHROMIUM_ENV: "/usr/bin/chromium",
               # what deploy/compose/compose.yaml and deploy/tls/make-certs.sh read, exported on the same hosts
               "DEFECTSCAN_IMAGE": "defectscan:1", "DEFECTSCAN_TARGET": "gpu", "DEFECTSCAN_DATA": "/srv/defectscan", "DEFECTSCAN_CERT_DAYS": "365"}
    assert load_settings(environ=environ).database_url is None


def test_values_that_would_be_misread_are_refused_and_passwords_masked_in_any_value(tmp_path):
    """An empty DEFECTSCAN_DATA_DIR put the database in the working folder; a URL inside a list was echoed with its password."""
    from defectscan.db.session import display_url

    for name, key in (("DEFECTSCAN_DATA_DIR", "data_dir"), ("DEFECTSCAN_INSPECTION__OUTPUT_DIR", "inspection.output_dir")):
        with pytest.raises(ConfigError, match=f"^environment variable {name}: key '{key}' has value '': expected a path, got an empty value$"):
            load_settings(environ={name: ""})
    config = tmp_path / "c.yaml"
    config.write_text("database_url:\n  - postgresql://u:s3cret@h/db\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=config)
    assert "s3cret" not in str(info.value) and "postgresql://u:***@h/db" in str(info.value)
    assert display_url("postgresql://u@127.0.0.1:1/db?password=s3cret") == "postgresql://u@127.0.0.1:1/db?password=***"


def test_log_level_in_any_case_as_the_flag_takes_it():
    assert load_settings(environ={"DEFECTSCAN_LOG_LEVEL": "debug"}).log_level == "DEBUG"


def test_unknown_key_in_file_names_file_key_and_accepted_keys(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("databse_url: sqlite:///x.sqlite\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    message = str(info.value)
    assert str(config) in message
    assert "unknown key 'databse_url'" in message
    assert "accepted keys: cluster, data_dir, database_url, inspection, log_level, qa" in message


def test_unknown_environment_variable_is_named():
    with pytest.raises(ConfigError, match="environment variable DEFECTSCAN_DATABSE_URL: unknown key 'databse_url'"):
        load_settings(environ={"DEFECTSCAN_DATABSE_URL": "sqlite:///x"})


def test_wrong_value_names_source_key_value_and_accepted(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("log_level: LOUD\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    message = str(info.value)
    assert f"{config}: key 'log_level' has value 'LOUD'" in message
    assert "'DEBUG', 'INFO', 'WARNING' or 'ERROR'" in message


def test_wrong_type_from_flag_names_the_flag():
    with pytest.raises(ConfigError, match=r"--database-url: key 'database_url' has value 'not a url'"):
        load_settings(environ={}, overrides={"database_url": ("not a url", "--database-url")})


def test_unsupported_backend_is_refused_and_password_masked():
    url = "mysql://qa:s3cret-pw@db.example/defectscan"
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"DEFECTSCAN_DATABASE_URL": url})
    message = str(info.value)
    assert "database backend 'mysql' is not supported; accepted: sqlite, postgresql" in message
    assert "s3cret-pw" not in message
    assert "mysql://qa:***@db.example/defectscan" in message


def test_invalid_yaml_names_file_and_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("log_level: INFO\ndatabase_url: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{config} line \d+: not valid YAML"):
        load_settings(config, environ={})


def test_top_level_must_be_a_mapping(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of settings at the top level, got list"):
        load_settings(config, environ={})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.yaml'}: settings file not found"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_every_default_is_defined_in_defaults_yaml():
    import yaml

    from defectscan.config import Settings

    assert set(yaml.safe_load(DEFAULTS_FILE.read_text())) == set(Settings.model_fields)
    assert all(field.is_required() for field in Settings.model_fields.values())


def test_nested_keys_from_environment_and_their_errors():
    settings = load_settings(environ={"DEFECTSCAN_CLUSTER__SCHEDULER": "tcp://10.0.0.5:8786", "DEFECTSCAN_INSPECTION__BATCH_SIZE": "4"})
    assert settings.cluster.scheduler == "tcp://10.0.0.5:8786"
    assert settings.inspection.batch_size == 4
    assert settings.inspection.tile_size == 1024  # untouched keys keep their defaults

    with pytest.raises(ConfigError, match="environment variable DEFECTSCAN_INSPECTION__HALO: key 'inspection.halo' has value '-16': Input should be greater than or equal to 0"):
        load_settings(environ={"DEFECTSCAN_INSPECTION__HALO": "-16"})
    with pytest.raises(ConfigError, match="unknown key 'cluster.workers'; accepted keys: memory_limit, n_workers, scheduler, shards_in_flight_per_worker, threads_per_worker, tls"):
        load_settings(environ={"DEFECTSCAN_CLUSTER__WORKERS": "3"})


def test_cross_field_rules(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("inspection:\n  batch_size: 8\n  images_per_shard: 20\ncluster:\n  tls:\n    ca_file: /etc/ca.pem\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    message = str(info.value)
    assert f"{config}: section 'inspection': images_per_shard (20) must be a multiple of batch_size (8)" in message
    assert f"{config}: section 'cluster.tls': give all three of ca_file, cert_file, key_file, or none" in message


def test_library_defaults_are_those_of_defaults_yaml(monkeypatch):
    """Library functions called without settings take the shipped defaults, never a copy of them,
    and the environment a process runs in does not change them."""
    from defectscan.config import shipped_defaults
    from defectscan.report.build import HoldRules

    monkeypatch.setenv("DEFECTSCAN_QA__HOLD_ABOVE", "0.5")
    assert shipped_defaults().qa.hold_above == load_settings(environ={}).qa.hold_above == 0.05
    assert HoldRules().hold_above == 0.05 and HoldRules(hold_above=0.2).hold_above == 0.2


def test_an_empty_section_sets_nothing_and_a_bad_one_is_blamed_on_its_own_layer(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("inspection:\n  # threshold: 0.5\n")
    assert load_settings(site, environ={}).inspection == load_settings(environ={}).inspection
    with pytest.raises(ConfigError, match=r"^environment variable DEFECTSCAN_QA: key 'qa' has value '1'"):
        load_settings(environ={"DEFECTSCAN_QA": "1"})


def test_a_sqlite_url_under_home_is_the_same_file_for_the_checks_and_the_driver(tmp_path, monkeypatch):
    """The checks looked in $HOME while the driver opened ./~/x.sqlite in the working folder."""
    from defectscan.db.migrate import upgrade
    from defectscan.db.session import make_engine, missing_sqlite_file, normalize_url

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///~/x.sqlite"
    assert normalize_url(url).database == str(tmp_path / "home" / "x.sqlite")
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    assert missing_sqlite_file(url) is None and (tmp_path / "home" / "x.sqlite").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("url, why", [
    ("sqlite://x.sqlite", "expected a SQLite file"),  # two slashes: a host, not a file
    ("sqlite://", "expected a SQLite file"),
    ("sqlite:///:memory:", "expected a SQLite file"),  # `db upgrade` said upgraded, the next command found no schema
    ("sqlite:///a.sqlite?timeout=abc", "the driver cannot read this URL: could not convert string to float: 'abc'"),
])
def test_database_urls_that_cannot_work_are_refused_in_one_line(url, why, cli):
    result = cli("--database-url", url, "db", "current")
    assert result.exit_code == 1 and f"key 'database_url' has value '{url}': {why}" in result.output
    assert "Traceback" not in result.output
