"""Reads for conversation templates: what a caller sees, and whether they may change it."""

from __future__ import annotations

from django.db.models import Q, QuerySet

from accounts.audit import audit_denied_lookup
from accounts.authentication import Principal
from accounts.models import TeamMembership
from chatbackend.errors import ApplicationError, NotFoundError

from .models import ConversationTemplate

Visibility = ConversationTemplate.Visibility


def team_ids_of(*, actor: Principal) -> set[int]:
    """Return the ids of the teams ``actor`` speaks for in the organization it acts in: the user's
    teams there, and the team of the API key used (a team's key: ``APIKey.team``). One query."""
    ids = set(
        TeamMembership.objects.filter(user=actor.user, team__organization=actor.organization).values_list(
            "team_id", flat=True
        )
    )
    if actor.api_key is not None and actor.api_key.team_id is not None:
        ids.add(actor.api_key.team_id)
    return ids


def template_list(*, actor: Principal) -> QuerySet[ConversationTemplate]:
    """Return the templates ``actor`` may use, in the organization the request acts in only: their
    own, those shared with one of their teams (``team_ids_of``), those shared with the organization.
    Its admins and owners (and the platform superuser acting in it) also see every team's shared
    templates, which they may change; nobody sees another member's private template. One query
    (plus ``team_ids_of``'s for a non-admin).
    """
    shared = Q(owner=actor.user) | Q(visibility=Visibility.ORGANIZATION)
    if actor.is_admin:
        shared |= Q(visibility=Visibility.TEAM, team__isnull=False)
    else:
        shared |= Q(visibility=Visibility.TEAM, team_id__in=team_ids_of(actor=actor))
    return ConversationTemplate.objects.filter(shared, organization=actor.organization).select_related("owner")


def template_may_change(*, actor: Principal, template: ConversationTemplate) -> bool:
    """Return True when ``actor`` may change or delete ``template``: its owner, or, for a shared one
    (team or organization), an admin or owner of its organization. Viewers never reach this for a
    write: ``accounts.scopes`` refuses them the ``chat`` scope."""
    if template.owner_id == actor.user.pk:
        return True
    return template.visibility != Visibility.PRIVATE and actor.is_admin


def template_get_for(*, actor: Principal, template_id: int, to_change: bool = False) -> ConversationTemplate:
    """Return template ``template_id`` if ``actor`` may see it (``template_list``).

    Raises ``NotFoundError`` (404 ``template_not_found``) otherwise: another organization's (audited,
    ``accounts.audit``) or another member's private template does not exist for you. ``to_change``:
    the caller wants to change or delete it; one who sees it but may not
    (``template_may_change``) gets ``ApplicationError`` 403 ``permission_denied``.
    """
    with audit_denied_lookup(
        actor=actor.user,
        organization=actor.organization,
        model=ConversationTemplate,
        lookup=Q(pk=template_id),
        code="template_not_found",
    ):
        try:
            template = template_list(actor=actor).get(pk=template_id)
        except (ConversationTemplate.DoesNotExist, ValueError, TypeError):
            raise NotFoundError("Template not found.", code="template_not_found") from None
    if to_change and not template_may_change(actor=actor, template=template):
        raise ApplicationError(
            "Only the template's owner (or, for a shared template, its organization's admins) may change it.",
            code="permission_denied",
            status=403,
        )
    return template
