"""Cost, cached prompt tokens and the end user of each usage row.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("cached_tokens", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("cost", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("end_user", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("end_user")
        batch.drop_column("cost")
        batch.drop_column("cached_tokens")
