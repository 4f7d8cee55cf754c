"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 05:03:24.654001
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('image_sets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('uri', sa.String(length=1024), nullable=False),
    sa.Column('array_path', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('lot', sa.String(length=128), nullable=True),
    sa.Column('line', sa.String(length=128), nullable=True),
    sa.Column('product', sa.String(length=128), nullable=True),
    sa.Column('camera', sa.String(length=128), nullable=True),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('shape', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('chunks', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('n_images', sa.Integer(), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('attrs', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('registered_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('stack', 'strip')", name=op.f('ck_image_sets_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_image_sets')),
    sa.UniqueConstraint('uri', name=op.f('uq_image_sets_uri'))
    )
    op.create_index(op.f('ix_image_sets_acquired_at'), 'image_sets', ['acquired_at'], unique=False)
    op.create_index(op.f('ix_image_sets_line_acquired_at'), 'image_sets', ['line', 'acquired_at'], unique=False)
    op.create_index(op.f('ix_image_sets_lot'), 'image_sets', ['lot'], unique=False)
    op.create_index(op.f('ix_image_sets_product'), 'image_sets', ['product'], unique=False)

    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('uri', sa.String(length=1024), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('architecture', sa.String(length=64), nullable=False),
    sa.Column('input_spec', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('classes', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('training', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('metrics', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('registered_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("stage IN ('staging', 'production', 'archived')", name=op.f('ck_models_stage')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_models_name_version'))
    )
    op.create_table('images',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('image_set_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['image_set_id'], ['image_sets.id'], name=op.f('fk_images_image_set_id_image_sets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('image_set_id', 'position', name=op.f('uq_images_image_set_id_position'))
    )
    op.create_index(op.f('ix_images_acquired_at'), 'images', ['acquired_at'], unique=False)
    op.create_index(op.f('ix_images_key'), 'images', ['key'], unique=False)

    op.create_table('job_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job', sa.String(length=128), nullable=False),
    sa.Column('spec', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('model_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('host', sa.String(length=255), nullable=True),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('n_images', sa.Integer(), nullable=False),
    sa.Column('n_inspected', sa.Integer(), nullable=False),
    sa.Column('n_skipped', sa.Integer(), nullable=False),
    sa.Column('n_errors', sa.Integer(), nullable=False),
    sa.Column('n_defects', sa.BigInteger(), nullable=False),
    sa.Column('images_per_second', sa.Float(), nullable=True),
    sa.Column('timings', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.CheckConstraint("status IN ('running', 'succeeded', 'partial', 'failed', 'interrupted')", name=op.f('ck_job_runs_status')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_job_runs_model_id_models'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_runs'))
    )
    op.create_index(op.f('ix_job_runs_job_started_at'), 'job_runs', ['job', 'started_at'], unique=False)
    op.create_index(op.f('ix_job_runs_status'), 'job_runs', ['status'], unique=False)

    op.create_table('job_locks',
    sa.Column('job', sa.String(length=128), nullable=False),
    sa.Column('job_run_id', sa.Integer(), nullable=True),
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_run_id'], ['job_runs.id'], name=op.f('fk_job_locks_job_run_id_job_runs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('job', name=op.f('pk_job_locks'))
    )
    op.create_table('inspections',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('image_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('job_run_id', sa.Integer(), nullable=True),
    sa.Column('verdict', sa.String(length=8), nullable=False),
    sa.Column('n_defects', sa.Integer(), nullable=False),
    sa.Column('defect_pixels', sa.BigInteger(), nullable=False),
    sa.Column('max_score', sa.Float(), nullable=False),
    sa.Column('mask_uri', sa.String(length=1024), nullable=True),
    sa.Column('mask_array', sa.String(length=255), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('duration_ms', sa.Float(), nullable=True),
    sa.Column('inspected_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("verdict IN ('pass', 'fail', 'error')", name=op.f('ck_inspections_verdict')),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_inspections_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_run_id'], ['job_runs.id'], name=op.f('fk_inspections_job_run_id_job_runs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_inspections_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inspections')),
    sa.UniqueConstraint('image_id', 'model_id', name=op.f('uq_inspections_image_id_model_id'))
    )
    op.create_index(op.f('ix_inspections_inspected_at'), 'inspections', ['inspected_at'], unique=False)
    op.create_index(op.f('ix_inspections_job_run_id'), 'inspections', ['job_run_id'], unique=False)
    op.create_index(op.f('ix_inspections_model_id_verdict'), 'inspections', ['model_id', 'verdict'], unique=False)

    op.create_table('inspection_daily',
    sa.Column('image_set_id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('images', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('errors', sa.Integer(), nullable=False),
    sa.Column('defects', sa.BigInteger(), nullable=False),
    sa.Column('first_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['image_set_id'], ['image_sets.id'], name=op.f('fk_inspection_daily_image_set_id_image_sets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_inspection_daily_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('image_set_id', 'model_id', 'day', name=op.f('pk_inspection_daily'))
    )
    op.create_index(op.f('ix_inspection_daily_day'), 'inspection_daily', ['day'], unique=False)

    op.create_table('defects',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('inspection_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('class_index', sa.Integer(), nullable=False),
    sa.Column('class_name', sa.String(length=64), nullable=False),
    sa.Column('bbox_y0', sa.Integer(), nullable=False),
    sa.Column('bbox_x0', sa.Integer(), nullable=False),
    sa.Column('bbox_y1', sa.Integer(), nullable=False),
    sa.Column('bbox_x1', sa.Integer(), nullable=False),
    sa.Column('area', sa.Integer(), nullable=False),
    sa.Column('centroid_y', sa.Float(), nullable=False),
    sa.Column('centroid_x', sa.Float(), nullable=False),
    sa.Column('orientation', sa.Float(), nullable=False),
    sa.Column('eccentricity', sa.Float(), nullable=False),
    sa.Column('mean_score', sa.Float(), nullable=False),
    sa.Column('max_score', sa.Float(), nullable=False),
    sa.Column('rle', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['inspection_id'], ['inspections.id'], name=op.f('fk_defects_inspection_id_inspections'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_defects'))
    )
    op.create_index(op.f('ix_defects_class_name_area'), 'defects', ['class_name', 'area'], unique=False)
    op.create_index(op.f('ix_defects_inspection_id'), 'defects', ['inspection_id'], unique=False)



def downgrade() -> None:
    op.drop_index(op.f('ix_defects_inspection_id'), table_name='defects')
    op.drop_index(op.f('ix_defects_class_name_area'), table_name='defects')

    op.drop_table('defects')
    op.drop_index(op.f('ix_inspections_model_id_verdict'), table_name='inspections')
    op.drop_index(op.f('ix_inspections_job_run_id'), table_name='inspections')
    op.drop_index(op.f('ix_inspections_inspected_at'), table_name='inspections')

    op.drop_index(op.f('ix_inspection_daily_day'), table_name='inspection_daily')
    op.drop_table('inspection_daily')
    op.drop_table('inspections')
    op.drop_table('job_locks')
    op.drop_index(op.f('ix_job_runs_status'), table_name='job_runs')
    op.drop_index(op.f('ix_job_runs_job_started_at'), table_name='job_runs')

    op.drop_table('job_runs')
    op.drop_index(op.f('ix_images_key'), table_name='images')
    op.drop_index(op.f('ix_images_acquired_at'), table_name='images')

    op.drop_table('images')
    op.drop_table('models')
    op.drop_index(op.f('ix_image_sets_product'), table_name='image_sets')
    op.drop_index(op.f('ix_image_sets_lot'), table_name='image_sets')
    op.drop_index(op.f('ix_image_sets_line_acquired_at'), table_name='image_sets')
    op.drop_index(op.f('ix_image_sets_acquired_at'), table_name='image_sets')

    op.drop_table('image_sets')
