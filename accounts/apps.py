from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save, pre_delete


def _join_default_organization(sender: type, *, instance: Any, created: bool, raw: bool = False, **kwargs: Any) -> None:
    # raw: loaddata, whose fixtures carry their own memberships; a team's service user joins its team's
    # only; an invited account its inviting organization only (User.joins_default_organization).
    if created and not raw and instance.service_team_id is None and instance.joins_default_organization:
        from .services import membership_join_default_organization

        membership_join_default_organization(user=instance)


def _team_membership_deleted(sender: type, *, instance: Any, **kwargs: Any) -> None:
    # A member who leaves a team takes no team key along (accounts.services.team_keys_revoke_departed).
    from .services import team_keys_revoke_departed

    team_keys_revoke_departed(team_id=instance.team_id, user_id=instance.user_id)


def _membership_deleted(sender: type, *, instance: Any, **kwargs: Any) -> None:
    # Whoever leaves an organization (over REST or in the admin) leaves its teams too; each team
    # membership's own post-delete signal then revokes the keys of that team they created.
    from .models import TeamMembership

    for team_membership in TeamMembership.objects.filter(
        user_id=instance.user_id, team__organization_id=instance.organization_id
    ):
        team_membership.delete()


def _deactivate_team_service_user(sender: type, *, instance: Any, **kwargs: Any) -> None:
    # pre_delete: the team's service user still names it (the delete sets service_team to NULL).
    from .services import team_service_user_deactivate

    team_service_user_deactivate(team=instance)


class AccountsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "accounts"

    def ready(self) -> None:
        # Every process drops its cached principals when a user or a key changes: a revocation,
        # a deactivation, a role or password change. A login's last_login write changes nothing.
        from .authentication import principal_cache
        from .models import APIKey, Membership, Organization, Team, User

        principal_cache.invalidate_on(User, unless_only=["last_login"])
        principal_cache.invalidate_on(APIKey)
        principal_cache.invalidate_on(Membership)
        principal_cache.invalidate_on(Organization)  # a slug renamed, rate limits: principals carry it
        principal_cache.invalidate_on(Team)  # rate limits: principals carry their key's team
        # Model access (accounts.model_access): an organization's or a team's list, or who is in a team.
        from .model_access import model_access_cache
        from .models import TeamMembership

        for model in (Organization, Team, TeamMembership, Membership, APIKey):
            model_access_cache.invalidate_on(model)
        # Every new user joins the default organization (single-tenant installations need no more).
        post_save.connect(_join_default_organization, sender=User, dispatch_uid="accounts.join_default_organization")
        post_delete.connect(
            _team_membership_deleted, sender=TeamMembership, dispatch_uid="accounts.team_membership_deleted"
        )
        post_delete.connect(_membership_deleted, sender=Membership, dispatch_uid="accounts.membership_deleted")
        # A deleted team's service user, which owned only the team's keys (deleted with it), is deactivated.
        pre_delete.connect(
            _deactivate_team_service_user, sender=Team, dispatch_uid="accounts.deactivate_team_service_user"
        )
        # Budgets are cached per process (accounts.metering.budgets): a change reaches every process.
        from .metering.budgets import budget_cache
        from .models import Budget

        budget_cache.invalidate_on(Budget)
        # ... and ends what a revoked key or a deactivated user has open (sockets, replies).
        from .revocation import connect_revocation_signals

        connect_revocation_signals()
        # Logins and failed logins (the admin's form, every authenticate()) go to the audit log.
        from .audit import connect_audit_signals

        connect_audit_signals()
