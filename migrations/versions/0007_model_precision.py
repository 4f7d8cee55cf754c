"""model precision

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 09:00:00.000000

A model version records the precision its workers compute in (float32, bfloat16, float16) and the
parity check against float32 that admitted it (model/precision.py). Versions registered before ran
in float32 and keep doing so: the column's default. The downgrade drops both columns; results
stay (a bfloat16 version's results remain its version's, which from then on runs in float32).

On SQLite the columns are added and dropped in place, not in batch mode: batch mode copies the
table and drops the original, and dropping `models` would cascade to every inspection of it.
SQLite (3.35 and later) adds and drops a column with its own CHECK constraint in place.
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
# As schema.PRECISIONS at this revision: a later change of that tuple gets its own migration.
_CHECK = "precision IN ('float32', 'bfloat16', 'float16')"


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    if _sqlite():
        op.execute(f"ALTER TABLE models ADD COLUMN precision VARCHAR(16) DEFAULT 'float32' NOT NULL CONSTRAINT ck_models_precision CHECK ({_CHECK})")
    else:
        op.add_column("models", sa.Column("precision", sa.String(length=16), server_default="float32", nullable=False))
        op.create_check_constraint(op.f("ck_models_precision"), "models", _CHECK)
    op.add_column("models", sa.Column("precision_check", _JSON, nullable=True))


def downgrade() -> None:
    if _sqlite():
        op.execute("ALTER TABLE models DROP COLUMN precision_check")
        op.execute("ALTER TABLE models DROP COLUMN precision")
        return
    op.drop_constraint(op.f("ck_models_precision"), "models", type_="check")
    op.drop_column("models", "precision_check")
    op.drop_column("models", "precision")
