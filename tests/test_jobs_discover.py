"""Discovery and selection of a job's image sets, and the lock's heartbeat thread (real Zarr stores and databases)."""

from __future__ import annotations

import datetime as dt
import shutil
import threading
import time

from defectscan.data import imageset as layout
from defectscan.db.schema import ImageSet, JobLock
from defectscan.db.session import make_engine
from defectscan.jobs.discover import discover, image_sets_with_work, match_stores
from defectscan.jobs.lock import Heartbeat, acquire
from defectscan.jobs.spec import JobSpec
from pipeline_helpers import add_model, save_threshold_model, square_images, write_stack
from sqlalchemy import select, update


def _spec(**source) -> JobSpec:
    return JobSpec.model_validate({"name": "line-a", "schedule": "* * * * *", "source": source, "model": "threshold:1"})


def test_discovery_registers_new_stores_once_and_leaves_out_masks_and_unfinished_stores(factory, tmp_path):
    incoming = tmp_path / "incoming"
    write_stack(incoming / "L1.zarr", square_images(2), lot="L1")
    write_stack(incoming / "L1.masks.zarr", square_images(2))
    unfinished = write_stack(incoming / "L2.zarr", square_images(2), lot="L2")
    import zarr

    zarr.open_group(unfinished, mode="a").attrs[layout.META_ATTR] = {"complete": False}
    (incoming / "notes.zarr").write_text("a file, not a store")
    spec_file = tmp_path / "line-a.yaml"
    spec = _spec(glob="incoming/*.zarr")

    with factory() as session:
        found = discover(session, spec, spec_file)
    assert found.matched == [str(incoming / "L1.zarr"), str(incoming / "L2.zarr")]
    assert (found.new, found.incomplete, found.problems) == ([str(incoming / "L1.zarr")], [str(incoming / "L2.zarr")], [])

    # `**` spans folders here as it does in a URL's glob.
    write_stack(incoming / "2026-03-02" / "L3.zarr", square_images(2), lot="L3")
    deep = match_stores(_spec(glob="incoming/**/*.zarr"), spec_file)
    assert str(incoming / "2026-03-02" / "L3.zarr") in deep and str(incoming / "L1.zarr") in deep
    shutil.rmtree(incoming / "2026-03-02")

    # Finished later: the next discovery registers it; L1 is not registered twice.
    zarr.open_group(unfinished, mode="a").attrs[layout.META_ATTR] = {"complete": True}
    with factory() as session:
        again = discover(session, spec, spec_file)
        assert again.new == [str(incoming / "L2.zarr")]
        assert sorted(session.scalars(select(ImageSet.lot))) == ["L1", "L2"]


def test_images_whose_chunks_arrive_after_registration_are_added_by_the_next_discovery(factory, tmp_path):
    """A camera still writing when the job ran: its missing images were left out, and no later run ever looked again."""
    from defectscan.db.schema import Image

    model = add_model(factory, save_threshold_model(tmp_path / "m.keras"))
    store = write_stack(tmp_path / "incoming" / "A1.zarr", square_images(4), lot="A1")
    aside = tmp_path / "aside"
    aside.mkdir()
    for position in (2, 3):
        shutil.move(store / "images" / "c" / str(position), aside / str(position))
    spec, spec_file = _spec(glob="incoming/*.zarr"), tmp_path / "line-a.yaml"

    def positions(session):
        return sorted(session.scalars(select(Image.position)))

    with factory() as session:
        first = discover(session, spec, spec_file)
        assert (first.new, first.arrived, positions(session)) == ([str(store)], 0, [0, 1])
        assert [p.split("]: ")[1] for p in first.problems] == ["chunk not stored (would read as blank pixels)"] * 2
        still = discover(session, spec, spec_file)  # not there yet: said again, so the run stays partial
        assert (still.new, still.arrived, len(still.problems)) == ([], 0, 2)
    shutil.move(aside / "3", store / "images" / "c" / "3")
    with factory() as session:
        one = discover(session, spec, spec_file)
        assert (one.arrived, len(one.problems), positions(session)) == (1, 1, [0, 1, 3])
        assert "image 2, key 2]" in one.problems[0]
    shutil.move(aside / "2", store / "images" / "c" / "2")
    with factory() as session:
        both = discover(session, spec, spec_file)
        assert (both.arrived, both.problems, positions(session)) == (1, [], [0, 1, 2, 3])
        image_set = session.scalar(select(ImageSet))
        assert (image_set.n_images, image_set.attrs["skipped"], image_set.attrs["missing_images"]) == (4, [], [])
        assert [s.id for s in image_sets_with_work(session, spec, model, both.matched)] == [image_set.id]
        assert discover(session, spec, spec_file).arrived == 0  # nothing left to look for


def test_giving_up_on_images_that_never_come_ends_the_partial_runs(factory, cli, migrated_url, tmp_path):
    """A frame the camera dropped: every later job run was partial, with no way to accept the loss."""
    store = write_stack(tmp_path / "incoming" / "A1.zarr", square_images(3), lot="A1")
    (store / "images" / "c" / "2" / "0" / "0").unlink()
    spec, spec_file = _spec(glob="incoming/*.zarr"), tmp_path / "line-a.yaml"
    with factory() as session:
        assert len(discover(session, spec, spec_file).problems) == 1
    run = lambda *args: cli("--database-url", migrated_url, "imagesets", "give-up-missing", *args)  # noqa: E731
    assert run("1", "--reason", " ").exit_code == 1
    done = run("1", "--reason", "camera dropped it", "--by", "ops")
    assert (done.exit_code, done.output) == (0, "image set 1: no longer waiting for image at position 2\n")
    with factory() as session:
        assert discover(session, spec, spec_file).problems == []
        given_up = session.scalar(select(ImageSet)).attrs["missing_given_up"]
    assert [(g["positions"], g["by"], g["reason"]) for g in given_up] == [([2], "ops", "camera dropped it")]
    again = run("1", "--reason", "twice")
    assert again.exit_code == 1 and "waits for no image: nothing to give up" in again.output


def test_image_sets_with_work_follow_the_model_and_the_filters(factory, tmp_path):
    model = add_model(factory, save_threshold_model(tmp_path / "m.keras"))
    old = write_stack(tmp_path / "old.zarr", square_images(2), lot="L1", acquired_at="2020-01-01T00:00:00Z")
    new = write_stack(tmp_path / "new.zarr", square_images(2), lot="L2", acquired_at=dt.datetime.now(dt.UTC).isoformat())
    from pipeline_helpers import register

    register(factory, old), register(factory, new)
    timeless = register(factory, write_stack(tmp_path / "timeless.zarr", square_images(2), lot="L3"))  # no capture time
    assert timeless.acquired_at is None
    with factory() as session:
        by_lot = image_sets_with_work(session, _spec(lot="L1"), model, [])
        recent = image_sets_with_work(session, _spec(since="7d"), model, [])
        by_glob = image_sets_with_work(session, _spec(glob="*.zarr"), model, [str(tmp_path / "new.zarr")])
        nothing_matched = image_sets_with_work(session, _spec(glob="*.zarr"), model, [])
    assert [s.lot for s in by_lot] == ["L1"]
    assert sorted(s.lot for s in recent) == ["L2", "L3"]  # a set without a capture time counts from its registration
    assert [s.lot for s in by_glob] == ["L2"]
    assert nothing_matched == []


def test_heartbeat_keeps_the_lock_fresh_and_reports_a_takeover(migrated_url):
    engine = make_engine(migrated_url)
    handle = acquire(engine, "line-a", stale_after=60)
    with engine.connect() as connection:
        first = connection.execute(select(JobLock.heartbeat_at)).scalar_one()
    lost = threading.Event()
    with Heartbeat(handle, interval=0.05, on_lost=lost.set):
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=10)
        while True:
            with engine.connect() as connection:
                beat = connection.execute(select(JobLock.heartbeat_at)).scalar_one()
            if beat > first or dt.datetime.now(dt.UTC) > deadline:
                break
            time.sleep(0.02)
        assert beat > first
        with engine.begin() as connection:
            connection.execute(update(JobLock).values(owner="someone-else/1:1:1"))
        assert lost.wait(10)
    assert handle.lost
    engine.dispose()


def test_a_store_changed_since_registration_is_reported_and_the_run_is_partial(cli, migrated_url, factory, tmp_path):
    from jobs_helpers import write_spec
    from pipeline_helpers import register

    add_model(factory, save_threshold_model(tmp_path / "m.keras"))
    store = write_stack(tmp_path / "incoming" / "L1.zarr", square_images(2), lot="L1")
    register(factory, store)
    import zarr

    zarr.open_group(store, mode="a").attrs["lot"] = "L1-relabelled"
    write_spec(tmp_path, "line-a", source={"glob": "incoming/*.zarr"}, model="threshold:1")
    # Nothing is left to inspect once the changed store is set aside: no cluster is contacted.
    result = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a")
    assert result.exit_code == 3, result.output
    assert f"{store}: changed since it was registered as image set 1 " in result.output
    assert result.output.count("refusing") == 1  # the message said it twice, once in parentheses
    assert "nothing new to inspect" in result.output


def test_the_spec_layers_over_the_environment_and_flags_over_the_spec(tmp_path):
    from defectscan.config import load_settings

    spec = JobSpec.model_validate({"name": "line-a", "schedule": "* * * * *", "source": {"lot": "L1"}, "model": "m",
                                   "inspection": {"batch_size": 2, "images_per_shard": 8}, "cluster": {"scheduler": "local"}})
    environ = {"DEFECTSCAN_INSPECTION__BATCH_SIZE": "4", "DEFECTSCAN_CLUSTER__SCHEDULER": "tls://dask:8786"}
    overrides = {k.replace("__", "."): v for k, v in spec.setting_overrides("line-a.yaml").items()}
    settings = spec.apply_to(load_settings(environ=environ, overrides=overrides))
    assert (settings.inspection.batch_size, settings.inspection.images_per_shard, settings.cluster.scheduler) == (2, 8, None)
    flagged = load_settings(environ=environ, overrides={**overrides, "inspection.batch_size": (8, "--batch-size")})
    assert flagged.inspection.batch_size == 8 and flagged.cluster.scheduler == "tls://dask:8786"


def test_a_null_in_the_spec_undoes_a_site_setting(tmp_path):
    from defectscan.config import load_settings

    site = tmp_path / "site.yaml"
    site.write_text("inspection:\n  threshold: 0.5\n  fail_score: 0.6\n")
    spec = JobSpec.model_validate({"name": "line-a", "schedule": "* * * * *", "source": {"lot": "L1"}, "model": "m",
                                   "inspection": {"threshold": None, "fail_score": None}})
    settings = load_settings(site, environ={}, overrides=spec.setting_overrides("line-a.yaml"))
    assert (settings.inspection.threshold, settings.inspection.fail_score) == (None, None)  # the model's operating point
    assert load_settings(site, environ={}).inspection.threshold == 0.5


def test_a_store_with_broken_metadata_is_named_and_the_others_still_go_on(cli, migrated_url, factory, tmp_path):
    """An empty images/zarr.json (a copy under way, a writer that crashed) raised JSONDecodeError out of discovery:
    the job failed every night, naming no store, and the good stores were never inspected."""
    from jobs_helpers import write_spec

    add_model(factory, save_threshold_model(tmp_path / "m.keras"))
    good = write_stack(tmp_path / "incoming" / "A1.zarr", square_images(2), lot="A1")
    broken = write_stack(tmp_path / "incoming" / "B1.zarr", square_images(2), lot="B1")
    (broken / "images" / "zarr.json").write_text("")
    with factory() as session:
        found = discover(session, _spec(glob="incoming/*.zarr"), tmp_path / "line-a.yaml")
    assert found.new == [str(good)]
    assert found.problems == [f"{broken}: the metadata of array 'images' cannot be read (JSONDecodeError: Expecting value: line 1 column 1 (char 0))"]

    # Registered, then its metadata cut short: the run names it and is partial (nothing else to inspect: no cluster).
    shutil.rmtree(broken)
    (good / "images" / "zarr.json").write_text('{"zarr_format": 3, "node_')
    write_spec(tmp_path, "line-a", source={"glob": "incoming/*.zarr"}, model="threshold:1")
    result = cli("--database-url", migrated_url, "jobs", "--jobs-dir", str(tmp_path), "run", "line-a")
    assert result.exit_code == 3, result.output
    assert f"{good}: the metadata of array 'images' cannot be read (JSONDecodeError" in result.output


def test_giving_up_waits_for_a_registration_changing_the_same_set_and_sees_its_change(factory, tmp_path):
    """Both read the set's attrs, changed them and wrote back what they read: the later write undid the other."""
    from defectscan.data.register import _locked_attrs, give_up_missing
    from defectscan.errors import DataError

    store = write_stack(tmp_path / "incoming" / "A1.zarr", square_images(3), lot="A1")
    (store / "images" / "c" / "2" / "0" / "0").unlink()
    with factory() as session:
        discover(session, _spec(glob="incoming/*.zarr"), tmp_path / "line-a.yaml")
    outcome = []

    def give_up():
        with factory() as other:
            try:
                outcome.append(give_up_missing(other, 1, "camera dropped it"))
            except DataError as exc:
                outcome.append(str(exc))

    with factory() as first:
        image_set = first.scalar(select(ImageSet))
        attrs = _locked_attrs(first, image_set)  # a registration under way: it has read the attrs and holds the row
        second = threading.Thread(target=give_up)
        second.start()
        second.join(1.5)
        assert second.is_alive() and not outcome  # waits instead of reading the attrs the first is about to change
        first.execute(update(ImageSet).values(attrs={**attrs, "missing_images": []}))  # the image came meanwhile
        first.commit()
    second.join(30)
    assert outcome == ["image set 1 (" + str(store) + ") waits for no image: nothing to give up"]
