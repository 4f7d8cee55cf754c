"""Alembic owns the schema: models and migrations agree, upgrades are idempotent, newer databases are refused."""

from __future__ import annotations

import re

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from defectscan.db.migrate import alembic_config, history, require_current, schema_state, upgrade
from defectscan.db.schema import Base
from defectscan.db.session import make_engine
from defectscan.errors import DatabaseError


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_migrations_match_the_models(engine):
    upgrade(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_upgrade_creates_every_table_and_then_is_a_no_op(engine):
    before, after = upgrade(engine)
    assert before.current is None
    assert after.is_current and after.current == after.head
    assert set(sa_inspect(engine).get_table_names()) >= set(Base.metadata.tables) | {"alembic_version"}

    again_before, again_after = upgrade(engine)
    assert again_before == again_after == after


def test_downgrade_to_base_and_back(engine):
    from alembic import command

    upgrade(engine)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert schema_state(engine).current is None
    assert not set(Base.metadata.tables) & set(sa_inspect(engine).get_table_names())
    upgrade(engine)
    assert schema_state(engine).is_current


def test_database_newer_than_code_is_refused(engine):
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffff_from_future'"))
    for action in (schema_state, upgrade, require_current):
        with pytest.raises(DatabaseError, match="schema revision 'ffff_from_future', which this version of defectscan does not know"):
            action(engine)


def test_empty_database_asks_for_upgrade(engine):
    with pytest.raises(DatabaseError, match="no defectscan schema yet: run `defectscan db upgrade`"):
        require_current(engine)


def test_reading_commands_on_a_missing_sqlite_file_say_so_and_create_nothing(cli, tmp_path):
    url = f"sqlite:///{tmp_path / 'mistyped' / 'x.sqlite'}"
    for args in (("lots", "list"), ("imagesets", "list")):
        result = cli("--database-url", url, *args)
        assert result.exit_code == 1 and f"no database at {tmp_path / 'mistyped' / 'x.sqlite'}: run `defectscan db upgrade`" in result.output
    current = cli("--database-url", url, "db", "current")
    assert current.exit_code == 0 and current.output.endswith("- no database file yet, so no schema yet: run `defectscan db upgrade`\n")
    assert not (tmp_path / "mistyped").exists()
    assert cli("--database-url", url, "db", "upgrade").exit_code == 0 and (tmp_path / "mistyped" / "x.sqlite").is_file()


def test_history_lists_the_initial_revision():
    revisions = history()
    assert revisions[-1][1] is None
    assert revisions[-1][0] == "0001"


def test_0002_gives_models_registered_before_it_the_rule_they_were_inspected_with(engine):
    """A version registered under 0001 keeps being judged as before: its threshold, area 16, fail score 0.5."""
    from alembic import command

    from defectscan.model.registry import get_model, operating_rules
    from defectscan.model.verdict import VerdictRules

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0001")
        connection.execute(text(
            "INSERT INTO models (name, version, uri, sha256, architecture, input_spec, classes, threshold, stage, registered_at) "
            "VALUES ('old', '1', '/m.keras', 'ab', 'x', '{}', '[\"defect\"]', 0.35, 'staging', '2026-01-01 00:00:00+00:00')"
        ))
    upgrade(engine)
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        row = get_model(session, "old:1")
        assert operating_rules(row) == VerdictRules(threshold=0.35, min_defect_area=16, fail_score=0.5)
        assert row.operating_point["chosen_by"] == "schema 0001 defaults"
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
    assert "operating_point" not in {c["name"] for c in sa_inspect(engine).get_columns("models")}
    upgrade(engine)


def test_0003_admits_abandoned_runs_and_its_downgrade_keeps_them_as_interrupted(engine):
    from alembic import command
    from sqlalchemy.exc import IntegrityError

    upgrade(engine)
    insert = text("INSERT INTO job_runs (job, status, started_at, n_images, n_skipped, n_inspected, n_errors, n_defects) "
                  "VALUES ('line-a', :status, '2026-01-01 00:00:00+00:00', 0, 0, 0, 0, 0)")
    with engine.begin() as connection:
        connection.execute(insert, {"status": "abandoned"})
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0002")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT status FROM job_runs")).scalars().all() == ["interrupted"]
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(insert, {"status": "abandoned"})
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(insert, {"status": "abandoned"})
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(insert, {"status": "lost"})


def _results(connection, images: list[tuple]) -> None:
    """One model, one image set (lot L1) and its images' inspections: (id, capture time, verdict, defects); a failed image
    gets one defect (ids follow the image's)."""
    connection.execute(text(
        "INSERT INTO models (id, name, version, uri, sha256, architecture, input_spec, classes, threshold, stage, registered_at) "
        "VALUES (1, 'm', '1', '/m.keras', 'ab', 'x', '{}', '[\"defect\"]', 0.5, 'staging', '2026-01-01 00:00:00+00:00')"))
    connection.execute(text(
        "INSERT INTO image_sets (id, uri, array_path, kind, lot, shape, dtype, chunks, n_images, checksum, registered_at) "
        f"VALUES (1, '/s.zarr', 'images', 'stack', 'L1', '[{len(images)}, 8, 8]', 'uint8', '[1, 8, 8]', {len(images)}, 'c', "
        "'2026-01-01 00:00:00+00:00')"))
    for image_id, when, verdict, n_defects in images:
        connection.execute(text("INSERT INTO images (id, image_set_id, position, key, height, width, acquired_at) "
                                "VALUES (:id, 1, :position, :key, 8, 8, :when)"), {"id": image_id, "position": image_id - 1, "key": f"k{image_id}", "when": when})
        connection.execute(text(
            "INSERT INTO inspections (id, image_id, model_id, verdict, n_defects, defect_pixels, max_score, inspected_at) "
            "VALUES (:id, :id, 1, :verdict, :n, :pixels, 0.9, '2026-01-05 11:00:00+00:00')"),
            {"id": image_id, "verdict": verdict, "n": n_defects, "pixels": 4 * n_defects})
        if n_defects:
            connection.execute(text(
                "INSERT INTO defects (id, inspection_id, class_index, class_name, bbox_y0, bbox_x0, bbox_y1, bbox_x1, area, centroid_y, "
                "centroid_x, orientation, eccentricity, mean_score, max_score, rle) VALUES (:id, :id, 0, 'defect', 0, 0, 2, 2, 4, 0.5, 0.5, "
                "0, 0, 0.8, 0.9, '0 4')"), {"id": image_id})


def test_0004_adds_the_review_tables_to_a_database_holding_results_and_its_downgrade_drops_only_them(engine):
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0003")
        _results(connection, [(1, None, "fail", 1)])
    upgrade(engine)
    with engine.connect() as connection:  # a version registered before gets its stage as the first history row
        assert connection.execute(text("SELECT model_id, from_stage, to_stage FROM model_stage_changes")).all() == [(1, None, "staging")]
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO defect_reviews (defect_id, image_id, decision, reviewer, reviewed_at) "
                                "VALUES (1, 1, 'false-call', 'anna', '2026-01-02 00:00:00+00:00')"))
        connection.execute(text("INSERT INTO image_reviews (image_id, inspection_id, decision, reviewer, reviewed_at) "
                                "VALUES (1, 1, 'pass', 'anna', '2026-01-02 00:00:00+00:00')"))
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0003")
    tables = set(sa_inspect(engine).get_table_names())
    assert not {"defect_reviews", "image_reviews", "model_stage_changes", "model_comparisons"} & tables
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM defects")).scalar() == 1
        assert connection.execute(text("SELECT verdict FROM inspections")).scalar() == "fail"
    upgrade(engine)


def test_the_upgrade_to_head_counts_the_decisions_recorded_before_0005_and_its_downgrade_keeps_them(engine):
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0004")
        _results(connection, [(1, "2026-01-05 10:00:00+00:00", "fail", 1), (2, "2026-01-05 10:01:00+00:00", "pass", 0)])
        connection.execute(text("INSERT INTO defect_reviews (defect_id, image_id, decision, reviewer, reviewed_at) "
                                "VALUES (1, 1, 'false-call', 'anna', '2026-01-06 00:00:00+00:00')"))
        connection.execute(text("INSERT INTO image_reviews (image_id, inspection_id, decision, reviewer, reviewed_at) "
                                "VALUES (2, 2, 'fail', 'ben', '2026-01-06 00:00:00+00:00')"))
        command.upgrade(alembic_config(connection), "0005")  # alembic alone: the table, empty
        assert connection.execute(text("SELECT count(*) FROM review_daily")).scalar() == 0
    upgrade(engine)  # at this code's head, it counts them
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT image_set_id, model_id, day, failed_reviewed, false_calls, passed_reviewed, escapes, defects_reviewed, "
            "defects_confirmed FROM review_daily")).all()
    # image 1: decided pass by its one false call (a false call); image 2: failed by QA although passed (an escape)
    assert [tuple(str(v) for v in row) for row in rows] == [("1", "1", "2026-01-05", "1", "1", "1", "1", "1", "0")]
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0004")
    assert "review_daily" not in set(sa_inspect(engine).get_table_names())
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM defect_reviews")).scalar() == 1
    upgrade(engine)


def test_0007_gives_versions_registered_before_it_float32_and_its_downgrade_keeps_their_results(engine):
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0006")
        _results(connection, [(1, None, "fail", 1), (2, None, "pass", 0)])
    upgrade(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT precision, precision_check FROM models")).all() == [("float32", None)]
    with engine.begin() as connection:
        connection.execute(text("UPDATE models SET precision = 'bfloat16', precision_check = '{\"agreement\": 1.0}'"))
    with pytest.raises(IntegrityError, match="(?i)check"):  # the column's constraint refuses a precision nobody runs
        with engine.begin() as connection:
            connection.execute(text("UPDATE models SET precision = 'int8'"))
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0006")
    assert not {"precision", "precision_check"} & {c["name"] for c in sa_inspect(engine).get_columns("models")}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM inspections")).scalar() == 2
        assert connection.execute(text("SELECT count(*) FROM defects")).scalar() == 1
        assert connection.execute(text("SELECT name, version FROM models")).all() == [("m", "1")]
    upgrade(engine)


def test_sqlite_table_copies_keep_every_reference_up_and_down(sqlite_url):
    """SQLite migrations that copy a table (0003 job_runs, 0002's downgrade of models) dropped the old one with
    foreign keys on: every inspection lost its job run (SET NULL) on the way up, every inspection (CASCADE) on
    the way down to 0001. Migrations now run with them off and check the references before committing."""
    from alembic import command

    from defectscan.db.migrate import migration_connection

    engine = make_engine(sqlite_url)
    upgrade(engine, "0002")
    with engine.begin() as connection:
        _results(connection, [(1, "2026-01-05 10:00:00+00:00", "fail", 1), (2, "2026-01-05 10:01:00+00:00", "pass", 0)])
        connection.execute(text("INSERT INTO job_runs (id, job, status, started_at, n_images, n_skipped, n_inspected, n_errors, n_defects) "
                                "VALUES (7, 'inspect', 'succeeded', '2026-01-05 10:00:00+00:00', 2, 0, 2, 0, 1)"))
        connection.execute(text("UPDATE inspections SET job_run_id = 7"))
    upgrade(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT job_run_id FROM inspections ORDER BY id")).scalars().all() == [7, 7]
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1  # on again for the application
    with migration_connection(engine) as connection:
        command.downgrade(alembic_config(connection), "0001")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT job_run_id FROM inspections ORDER BY id")).scalars().all() == [7, 7]
        assert connection.execute(text("SELECT count(*) FROM defects")).scalar() == 1
    engine.dispose()


def test_a_failed_sqlite_upgrade_changes_nothing_and_can_be_run_again(sqlite_url):
    """pysqlite ran the DDL outside the transaction: a failed upgrade left 0006 with 0007's columns ('duplicate
    column name: precision' for ever after), a failed first upgrade left tables ('table image_sets already exists')."""
    from alembic import command

    engine = make_engine(sqlite_url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0006")
    with engine.begin() as connection:
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.execute(text("INSERT INTO images (id, image_set_id, position, key, height, width) VALUES (2, 999, 0, 'orphan', 8, 8)"))
    for _ in range(2):
        with pytest.raises(DatabaseError, match=r"after the migration 1 rows have references that do not resolve \(first: table images, row 2; "):
            upgrade(engine)
        assert schema_state(engine).current == "0006"
        assert not {"precision", "precision_check"} & {c["name"] for c in sa_inspect(engine).get_columns("models")}
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM images WHERE id = 2"))
    assert upgrade(engine)[1].is_current
    engine.dispose()


def test_another_applications_database_is_not_given_defectscans_tables(engine):
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE customers (id INTEGER PRIMARY KEY)"))
        connection.execute(text("CREATE TABLE models (id INTEGER PRIMARY KEY)"))
    with pytest.raises(DatabaseError, match=r"holds tables \(customers, models\) but no defectscan schema revision: not a defectscan database"):
        upgrade(engine)
    assert sorted(sa_inspect(engine).get_table_names()) == ["customers", "models"]


def test_an_upgrade_to_a_revision_below_the_current_one_is_refused(engine):
    """It printed 'already at revision 0007, nothing to do' and exited 0."""
    upgrade(engine)
    head = schema_state(engine).head
    with pytest.raises(DatabaseError, match=f"is at revision '{head}', above '0003': db upgrade does not downgrade"):
        upgrade(engine, "0003")
    assert upgrade(engine, head)[1].current == head
    # Alembic's own forms: `base` said "already at revision 0007, nothing to do", an empty one failed an assertion.
    for revision in ("base", "", "-1", "0003+1"):
        with pytest.raises(DatabaseError, match=f"--revision '{re.escape(revision)}': expected head or one of this defectscan's schema revisions"):
            upgrade(engine, revision)


def test_a_read_only_sqlite_database_with_commits_still_in_its_wal_is_refused_not_read_stale(tmp_path):
    """Opened immutable, it showed the database file without the -wal's commits: a deleted model still listed."""
    import os
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "db"
    folder.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("a read-only folder needs a tmpfs mount (root): as root the file's permissions do not stop writes")
    path = folder / "defectscan.sqlite"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    # A writer killed before it checkpointed: its commit is in the -wal only.
    killed = ("import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_autocheckpoint=0'); "
              "c.execute('CREATE TABLE committed_later (x INTEGER)'); c.commit(); os._exit(0)")
    subprocess.run([sys.executable, "-c", killed, str(path)], check=True)
    assert (folder / "defectscan.sqlite-wal").stat().st_size > 0
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        with pytest.raises(DatabaseError, match=r"its folder is read-only and its -wal file holds \d+ bytes of commits not yet in the database file"):
            make_engine(f"sqlite:///{path}")
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
