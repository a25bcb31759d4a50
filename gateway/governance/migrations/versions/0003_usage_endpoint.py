"""The endpoint of each usage row (chat, embeddings, ...).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage", sa.Column("endpoint", sa.String(20), nullable=True))


def downgrade() -> None:
    op.drop_column("usage", "endpoint")
