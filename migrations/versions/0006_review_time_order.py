"""review lists in time order

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 00:00:00.000000

`review list` pages through decisions newest first by (reviewed_at, id). Before, an unfiltered list
took each kind's newest rows by id and merged them by time, which skipped or repeated rows across
pages whenever two reviewers' clocks disagreed with the order their rows were inserted in. These
indexes serve the time order without sorting a million decisions.
"""

from alembic import op


revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_defect_reviews_reviewed_at_id"), "defect_reviews", ["reviewed_at", "id"])
    op.create_index(op.f("ix_image_reviews_reviewed_at_id"), "image_reviews", ["reviewed_at", "id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_image_reviews_reviewed_at_id"), table_name="image_reviews")
    op.drop_index(op.f("ix_defect_reviews_reviewed_at_id"), table_name="defect_reviews")
