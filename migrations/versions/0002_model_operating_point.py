"""model operating point

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:30:00.000000

The verdict rule chosen for a model version moves into the models row. Versions registered
before have only a threshold: they get the rule inspection applied to them until now (that
threshold, min_defect_area 16, fail_score 0.5, the settings' defaults of schema 0001), so their
future results are judged exactly as their past ones.
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.add_column("models", sa.Column("operating_point", _JSON, nullable=True))
    models = sa.table("models", sa.column("id", sa.Integer), sa.column("threshold", sa.Float), sa.column("operating_point", _JSON))
    connection = op.get_bind()
    for model_id, threshold in connection.execute(sa.select(models.c.id, models.c.threshold)).all():
        rule = {"threshold": threshold, "min_defect_area": 16, "fail_score": 0.5, "chosen_by": "schema 0001 defaults"}
        connection.execute(models.update().where(models.c.id == model_id).values(operating_point=rule))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("operating_point")
