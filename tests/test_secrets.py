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
