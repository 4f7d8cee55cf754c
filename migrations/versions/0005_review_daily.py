"""review_daily: QA's figures per image set, model and capture day

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 20:00:00.000000

The lots listing's QA figures (false-call and escape rates) decided every reviewed image of the
listed lots on each call: at QA decisions on 10 % of a million images, a second per page. Like
`inspection_daily` for the inspection counts, `review_daily` holds them per image set, model and
UTC capture day, recounted for an image set whenever a decision on it is recorded or one of its
reviewed images is inspected again (db/reviews.py). The decisions already recorded are counted
by `defectscan db upgrade` once the schema is at this code's head (db/migrate.py), not here: the
count uses the application's decision rules and models, which describe the head schema, not this
revision's. The downgrade drops the table only (the decisions stay in their tables).
"""

from alembic import op
import sqlalchemy as sa


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "review_daily",
        sa.Column("image_set_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("failed_reviewed", sa.Integer(), nullable=False),
        sa.Column("false_calls", sa.Integer(), nullable=False),
        sa.Column("passed_reviewed", sa.Integer(), nullable=False),
        sa.Column("escapes", sa.Integer(), nullable=False),
        sa.Column("defects_reviewed", sa.Integer(), nullable=False),
        sa.Column("defects_confirmed", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["image_set_id"], ["image_sets.id"], name=op.f("fk_review_daily_image_set_id_image_sets"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_review_daily_model_id_models"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("image_set_id", "model_id", "day", name=op.f("pk_review_daily")),
    )
    op.create_index(op.f("ix_review_daily_day"), "review_daily", ["day"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_review_daily_day"), table_name="review_daily")
    op.drop_table("review_daily")
