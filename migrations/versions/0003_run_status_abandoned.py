"""run status abandoned

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 12:45:00.000000

A `running` row whose client died (no heartbeat for inspection.stale_run_after_s) is closed as
`abandoned` by the next run or `jobs history`, so the status check admits the new value.
Downgrading turns abandoned runs into `interrupted`, the closest status schema 0002 knows.
"""

from alembic import op
import sqlalchemy as sa


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BEFORE = ("running", "succeeded", "partial", "failed", "interrupted")
_AFTER = (*_BEFORE, "abandoned")


def _check(values: tuple[str, ...]) -> str:
    return "status IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _replace_check(values: tuple[str, ...]) -> None:
    # SQLite cannot alter a constraint: batch mode copies the table with the new one.
    with op.batch_alter_table("job_runs", recreate="auto") as batch:
        batch.drop_constraint(op.f("ck_job_runs_status"), type_="check")
        batch.create_check_constraint("status", _check(values))


def upgrade() -> None:
    _replace_check(_AFTER)


def downgrade() -> None:
    runs = sa.table("job_runs", sa.column("status", sa.String))
    op.execute(runs.update().where(runs.c.status == "abandoned").values(status="interrupted"))
    _replace_check(_BEFORE)
