"""Who counts as a moderator: Manage Server permission, or the configured moderator role."""

from __future__ import annotations

from collections.abc import Iterable

MANAGE_GUILD = 1 << 5
ADMINISTRATOR = 1 << 3


def is_moderator(permissions: int, role_ids: Iterable[str], role_names: Iterable[str],
                 moderator_role: str) -> bool:
    """``moderator_role`` is a role name or id (setting DISCORD_MODERATOR_ROLE)."""
    if permissions & (MANAGE_GUILD | ADMINISTRATOR):
        return True
    wanted = moderator_role.strip()
    if not wanted:
        return False
    return wanted in {str(r) for r in role_ids} or wanted.lower() in {n.lower() for n in role_names}
