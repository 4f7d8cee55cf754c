"""Constraints the pipeline relies on, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from defectscan.db.schema import Defect, Image, ImageSet, Inspection, Model


def _model(name="tinyunet", version="1"):
    return Model(name=name, version=version, uri="/m.keras", sha256="0" * 64, architecture="tinyunet",
                 input_spec={"channels": 1}, classes=["defect"], threshold=0.5)


def _image_set(uri="/data/L1.zarr"):
    return ImageSet(uri=uri, array_path="images", kind="stack", lot="L1", line="A", shape=[2, 64, 64],
                    dtype="uint8", chunks=[1, 64, 64], n_images=2, checksum="c" * 64,
                    acquired_at=dt.datetime(2026, 11, 1, 6, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))))


def test_one_inspection_per_image_and_model(session):
    model, image_set = _model(), _image_set()
    image = Image(image_set=image_set, position=0, key="SN-1", height=64, width=64)
    session.add_all([model, image_set, image, Inspection(image=image, model=model, verdict="pass")])
    session.commit()
    session.add(Inspection(image=image, model=model, verdict="fail"))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()
    session.add(Inspection(image=image, model=_model(version="2"), verdict="fail"))
    session.commit()


def test_times_come_back_in_utc(session):
    session.add(_image_set())
    session.commit()
    session.expunge_all()
    stored = session.scalars(select(ImageSet)).one()
    assert stored.acquired_at == dt.datetime(2026, 11, 1, 4, 30, tzinfo=dt.timezone.utc)
    assert stored.registered_at.tzinfo is not None


def test_naive_datetimes_are_refused(session):
    image_set = _image_set()
    image_set.acquired_at = dt.datetime(2026, 11, 1, 6, 30)
    session.add(image_set)
    with pytest.raises(Exception, match="naive datetime"):
        session.commit()


def test_deleting_an_image_set_removes_its_images_inspections_and_defects(session):
    model, image_set = _model(), _image_set()
    image = Image(image_set=image_set, position=0, key="SN-1", height=64, width=64)
    inspection = Inspection(image=image, model=model, verdict="fail", n_defects=1)
    inspection.defects.append(Defect(class_index=0, class_name="scratch", bbox_y0=1, bbox_x0=2, bbox_y1=5, bbox_x1=9,
                                     area=20, centroid_y=3.0, centroid_x=5.5, orientation=0.1, eccentricity=0.9,
                                     mean_score=0.8, max_score=0.95, rle="1 3"))
    session.add_all([model, image_set, image, inspection])
    session.commit()
    session.delete(image_set)
    session.commit()
    assert session.scalars(select(Defect)).all() == []
    assert session.scalars(select(Inspection)).all() == []
    assert session.scalars(select(Model)).one().name == "tinyunet"


def test_verdict_must_be_known(session):
    model, image_set = _model(), _image_set()
    image = Image(image_set=image_set, position=0, key="SN-1", height=64, width=64)
    session.add_all([model, image_set, image, Inspection(image=image, model=model, verdict="maybe")])
    with pytest.raises(IntegrityError):
        session.commit()
