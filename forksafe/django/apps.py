"""The Django app config of ``"forksafe.django"`` (found by Django automatically)."""

from __future__ import annotations

from django.apps import AppConfig

__all__ = ["ForksafeConfig"]


class ForksafeConfig(AppConfig):  # type: ignore[misc]  # Django ships no type hints
    """Installs forksafe's after-fork reset of every database alias."""

    name = "forksafe.django"
    label = "forksafe_django"
    verbose_name = "forksafe"

    def ready(self) -> None:
        """Register the reset (idempotent; importing forksafe.django already did)."""
        from forksafe.django import install

        install()
