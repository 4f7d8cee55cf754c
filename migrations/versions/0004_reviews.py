"""reviews, model stage history and comparisons

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 16:00:00.000000

QA's decisions on the model's results: `defect_reviews` (confirmed or false-call, per defect) and
`image_reviews` (pass or fail per image, with an optional drawn mask and class for a missed
defect). Both only grow: the newest row of a defect or image is its decision, older rows its
history. Nothing in the existing tables changes, so the upgrade of a database holding results
is instant and the downgrade drops the two tables (and the decisions in them) only.

`model_stage_changes` is each version's stage history (promote, archive: who, when, why);
versions registered before it get one row, their registration stage as it stands.
`model_comparisons` records each shadow comparison of a candidate version against another.
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _who_when_why() -> list[sa.Column]:
    return [
        sa.Column("reviewer", sa.String(length=128), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "model_stage_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("from_stage", sa.String(length=16), nullable=True),
        sa.Column("to_stage", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("changed_by", sa.String(length=128), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("to_stage IN ('staging', 'production', 'archived')", name=op.f("ck_model_stage_changes_to_stage")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_model_stage_changes_model_id_models"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_stage_changes")),
    )
    op.create_index(op.f("ix_model_stage_changes_model_id_id"), "model_stage_changes", ["model_id", "id"])
    op.create_table(
        "model_comparisons",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("candidate_id", sa.Integer(), nullable=False),
        sa.Column("current_id", sa.Integer(), nullable=False),
        sa.Column("scope", _JSON, nullable=False),
        sa.Column("figures", _JSON, nullable=False),
        sa.Column("compared_by", sa.String(length=128), nullable=False),
        sa.Column("compared_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["candidate_id"], ["models.id"], name=op.f("fk_model_comparisons_candidate_id_models"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["current_id"], ["models.id"], name=op.f("fk_model_comparisons_current_id_models"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_comparisons")),
    )
    op.create_index(op.f("ix_model_comparisons_candidate_id_current_id"), "model_comparisons", ["candidate_id", "current_id"])
    models = sa.table("models", sa.column("id", sa.Integer), sa.column("stage", sa.String), sa.column("registered_at", sa.DateTime))
    changes = sa.table("model_stage_changes", sa.column("model_id", sa.Integer), sa.column("to_stage", sa.String),
                       sa.column("reason", sa.Text), sa.column("changed_by", sa.String), sa.column("changed_at", sa.DateTime))
    op.execute(changes.insert().from_select(
        ["model_id", "to_stage", "reason", "changed_by", "changed_at"],
        sa.select(models.c.id, models.c.stage, sa.literal("registered (before stage history)"), sa.literal("defectscan"),
                  models.c.registered_at),
    ))
    op.create_table(
        "defect_reviews",
        sa.Column("id", _ID, nullable=False),
        sa.Column("defect_id", _ID, nullable=True),
        sa.Column("image_id", _ID, nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        *_who_when_why(),
        sa.CheckConstraint("decision IN ('confirmed', 'false-call')", name=op.f("ck_defect_reviews_decision")),
        sa.ForeignKeyConstraint(["defect_id"], ["defects.id"], name=op.f("fk_defect_reviews_defect_id_defects"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_defect_reviews_image_id_images"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_defect_reviews")),
    )
    op.create_index(op.f("ix_defect_reviews_defect_id_id"), "defect_reviews", ["defect_id", "id"])
    op.create_index(op.f("ix_defect_reviews_image_id"), "defect_reviews", ["image_id"])
    op.create_table(
        "image_reviews",
        sa.Column("id", _ID, nullable=False),
        sa.Column("image_id", _ID, nullable=False),
        sa.Column("inspection_id", _ID, nullable=True),
        sa.Column("decision", sa.String(length=8), nullable=False),
        sa.Column("class_name", sa.String(length=64), nullable=True),
        sa.Column("bbox_y0", sa.Integer(), nullable=True),
        sa.Column("bbox_x0", sa.Integer(), nullable=True),
        sa.Column("bbox_y1", sa.Integer(), nullable=True),
        sa.Column("bbox_x1", sa.Integer(), nullable=True),
        sa.Column("rle", sa.Text(), nullable=True),
        *_who_when_why(),
        sa.CheckConstraint("decision IN ('pass', 'fail')", name=op.f("ck_image_reviews_decision")),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_image_reviews_image_id_images"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["inspection_id"], ["inspections.id"], name=op.f("fk_image_reviews_inspection_id_inspections"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_reviews")),
    )
    op.create_index(op.f("ix_image_reviews_image_id_id"), "image_reviews", ["image_id", "id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_model_comparisons_candidate_id_current_id"), table_name="model_comparisons")
    op.drop_table("model_comparisons")
    op.drop_index(op.f("ix_model_stage_changes_model_id_id"), table_name="model_stage_changes")
    op.drop_table("model_stage_changes")
    op.drop_index(op.f("ix_image_reviews_image_id_id"), table_name="image_reviews")
    op.drop_table("image_reviews")
    op.drop_index(op.f("ix_defect_reviews_image_id"), table_name="defect_reviews")
    op.drop_index(op.f("ix_defect_reviews_defect_id_id"), table_name="defect_reviews")
    op.drop_table("defect_reviews")
