import logging

from defectscan.logs import MaskSecrets
from defectscan.secrets import mask_secrets


def test_masks_passwords_in_urls_and_key_value_pairs():
    assert mask_secrets("postgresql://qa:pa:ss@db:5432/x") == "postgresql://qa:***@db:5432/x"
    assert mask_secrets("postgresql+psycopg://qa:pw@db/x and redis://:token@cache/0") == (
        "postgresql+psycopg://qa:***@db/x and redis://:***@cache/0"
    )
    assert mask_secrets("host=db password=hunter2 user=qa") == "host=db password=*** user=qa"
    assert mask_secrets("PASSWORD = 'two words' dbname=x") == "PASSWORD = *** dbname=x"


def test_leaves_urls_without_password_alone():
    for text in ("postgresql://qa@db/x", "sqlite:////var/lib/defectscan.sqlite", "tcp://10.0.0.1:8786", "http://host:8787/status"):
        assert mask_secrets(text) == text


def test_log_records_are_masked():
    record = logging.LogRecord("defectscan", logging.INFO, __file__, 1, "connecting to %s", ("postgresql://qa:pw@db/x",), None)
    MaskSecrets().filter(record)
    assert record.getMessage() == "connecting to postgresql://qa:***@db/x"


def test_masks_the_client_keys_passphrase_and_keys_and_never_spans_fields():
    """sslpassword= got out; masking a serialised record ran from one field into the next and broke its JSON."""
    from defectscan.secrets import mask_secrets_in

    assert mask_secrets("postgresql://u:pw@127.0.0.1:1/db?sslpassword=KEYPASS") == "postgresql://u:***@127.0.0.1:1/db?sslpassword=***"
    assert mask_secrets("aws_secret_access_key=XYZ and db_password = 'a b'") == "aws_secret_access_key=*** and db_password = ***"
    assert mask_secrets('password=Xy,9&k"Q2 next') == "password=*** next"  # unquoted, libpq takes it whole
    assert mask_secrets("postgresql://qa:ab/cd@db:5432/x") == "postgresql://qa:***@db:5432/x"
    # Not secrets: a scheduler address, then an e-mail address further on.
    for text in ("http://host:8080/path then mail@x.org", "Line 3 on tls://dask-scheduler:8786 (questions: qa@plant.example)"):
        assert mask_secrets(text) == text
    record = {"error": "tls://dask-scheduler:8786 did not answer", "spec": {"notify": "qa@plant.example", "db": "s3://b/x.zarr?password=abc"}}
    assert mask_secrets_in(record) == {**record, "spec": {"notify": "qa@plant.example", "db": "s3://b/x.zarr?password=***"}}
