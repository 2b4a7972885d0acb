"""Integration tests run the real tools' code; they reuse the unit suite's checkpoint fixtures."""

from tests.conftest import _isolated_home, checkpoints, vit_b_state  # noqa: F401
