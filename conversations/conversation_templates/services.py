"""Writes for conversation templates: create, update, delete, import NextChat masks, and start a
conversation from one."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction

from accounts.authentication import Principal
from accounts.model_access import ModelAccess
from accounts.models import Team
from chatbackend.errors import ApplicationError, NotFoundError
from conversations.models import Conversation, Message
from conversations.services import MAX_TITLE_CHARS, conversation_create, message_chain
from llm.selectors import llm_model_get_enabled_for

from .models import PARAMETER_NAMES, ConversationTemplate
from .nextchat import masks_parse
from .selectors import team_ids_of

Visibility = ConversationTemplate.Visibility

# The fields ``template_create`` and ``template_update`` take (``model_name`` is the API's ``model``).
TEMPLATE_FIELDS = ("name", "system_prompt", "model_name", *PARAMETER_NAMES, "starter_messages", "visibility", "team")


def _sharing_check(*, actor: Principal, template: ConversationTemplate) -> None:
    """Check ``template``'s ``visibility`` and ``team``: a team template names a team of the
    organization that ``actor`` belongs to (its admins may share with any team there); other
    visibilities name no team. Raises ``ApplicationError`` 400 ``param`` ``team``."""
    if template.visibility != Visibility.TEAM:
        template.team = None
        return
    team = template.team
    if team is None:
        raise ApplicationError("A template shared with a team needs its team.", code="team_required", param="team")
    if team.organization_id != actor.organization.pk or not (actor.is_admin or team.pk in team_ids_of(actor=actor)):
        raise ApplicationError(
            "team must be a team of this organization that you belong to.", code="invalid_team", param="team"
        )


def _team(value: Any) -> Team | None:
    """Return the team of id ``value`` (None: none); an id of no team is a 400 ``invalid_team``."""
    if value is None or isinstance(value, Team):
        return value
    team = Team.objects.filter(pk=value).first()
    if team is None:
        raise ApplicationError(
            "team must be a team of this organization that you belong to.", code="invalid_team", param="team"
        )
    return team


def _model_check(*, name: str, access: ModelAccess) -> None:
    """Refuse a model name ``access`` does not allow (404 ``model_not_found``, as conversations do);
    a blank one (the conversation names its model) passes."""
    if name:
        llm_model_get_enabled_for(access=access, name=name)


def template_create(*, actor: Principal, data: dict[str, Any], access: ModelAccess) -> ConversationTemplate:
    """Create a template of ``actor`` in the organization the request acts in from ``data``
    (``TEMPLATE_FIELDS``; ``team`` a team id). ``access``: the caller's model access
    (``accounts.model_access``): a model outside it is a 404 ``model_not_found``. Raises
    ``ApplicationError`` 400 for a ``team`` that does not fit the ``visibility``.
    """
    template = ConversationTemplate(owner=actor.user, organization=actor.organization)
    for name in TEMPLATE_FIELDS:
        if name in data:
            setattr(template, name, _team(data[name]) if name == "team" else data[name])
    _model_check(name=template.model_name, access=access)
    _sharing_check(actor=actor, template=template)
    template.save()
    return template


def template_update(
    *, actor: Principal, template: ConversationTemplate, data: dict[str, Any], access: ModelAccess
) -> ConversationTemplate:
    """Change the ``TEMPLATE_FIELDS`` of ``template`` present in ``data`` (the caller checked that
    ``actor`` may: ``selectors.template_get_for(to_change=True)``). Raises as ``template_create``,
    and ``ApplicationError`` 403 ``permission_denied`` when someone other than the owner (an admin
    moderating a shared template) would change who it is shared with: that is the owner's choice.
    """
    sharing = (template.visibility, template.team_id)
    for name in TEMPLATE_FIELDS:
        if name in data:
            setattr(template, name, _team(data[name]) if name == "team" else data[name])
    if "model_name" in data:
        _model_check(name=template.model_name, access=access)
    _sharing_check(actor=actor, template=template)
    if template.owner_id != actor.user.pk and (template.visibility, template.team_id) != sharing:
        raise ApplicationError(
            "Only the template's owner may change who it is shared with.", code="permission_denied", status=403
        )
    template.save()
    return template


def template_delete(*, template: ConversationTemplate) -> None:
    """Delete ``template``; conversations made from it stay (their ``template`` becomes null)."""
    template.delete()


def template_import(*, actor: Principal, document: Any) -> list[ConversationTemplate]:
    """Import NextChat masks (``nextchat.masks_parse``: one mask or a list) as private templates of
    ``actor`` in the organization the request acts in; return them in the document's order.

    A mask whose ``id`` ``actor`` imported before updates that template instead of adding a copy
    (its sharing stays). Model names are kept as the masks have them, even when this server has
    no such model: a conversation started from the template names its model then. All or
    nothing: a mask that fails validation is a 400 (``param`` naming it) and nothing is written.
    """
    parsed = masks_parse(document)
    with transaction.atomic():
        return templates_upsert(actor=actor, parsed=parsed)


def templates_upsert(*, actor: Principal, parsed: list[dict[str, Any]]) -> list[ConversationTemplate]:
    """Write ``parsed`` (``nextchat.mask_template_fields`` of each mask) as private templates of
    ``actor`` in the organization the request acts in; return them in that order. A mask whose ``id``
    ``actor`` imported before updates that template (its sharing stays) instead of adding a copy,
    and is written only when a field changed. Run it in a transaction, with ``actor``'s imports
    serialized when two may run at once (a template's ``external_id`` is unique per owner and
    organization: the second insert would fail).
    """
    external_ids = [fields["external_id"] for fields in parsed if fields["external_id"]]
    existing = {
        template.external_id: template
        for template in ConversationTemplate.objects.filter(
            organization=actor.organization, owner=actor.user, external_id__in=external_ids
        )
    }
    templates = []
    for fields in parsed:
        template = existing.get(fields["external_id"]) if fields["external_id"] else None
        if template is None:
            template = ConversationTemplate(owner=actor.user, organization=actor.organization)
            if fields["external_id"]:
                existing[fields["external_id"]] = template  # a mask repeated in one document: one template
        changed = [name for name, value in fields.items() if template.pk is None or getattr(template, name) != value]
        for name in changed:
            setattr(template, name, fields[name])
        if template.pk is None:
            template.save()
        elif changed:  # a sync sends every mask each time: only what changed is written (and dated)
            template.save(update_fields=[*changed, "updated_at"])
        templates.append(template)
    return templates


def template_conversation_create(
    *,
    actor: Principal,
    template: ConversationTemplate,
    access: ModelAccess,
    title: str = "",
    model_name: str = "",
) -> Conversation:
    """Start a conversation of ``actor`` from ``template``: its system prompt, model (``model_name``
    overrides it), parameters (``Conversation.parameters``, sent with every reply) and its starter
    messages as the first messages of the active branch (``conversations.services.message_chain``).

    ``title``: the conversation's (default: the template's name). ``access``: the caller's model
    access; a model outside it, or none at all, is a 404 ``model_not_found``
    (``conversation_create``) / a 400 ``model_required``.
    """
    model_name = model_name or template.model_name
    if not model_name:
        raise ApplicationError(
            "This template names no model: send one as 'model'.", code="model_required", param="model"
        )
    try:
        with transaction.atomic():
            conversation = conversation_create(
                owner=actor.user,
                organization=actor.organization,
                model_name=model_name,
                title=title or template.name[:MAX_TITLE_CHARS],
                system_prompt=template.system_prompt,
                access=access,
            )
            conversation.parameters = template.parameters
            conversation.template = template
            conversation.save(update_fields=["parameters", "template"])
            messages = Message.objects.bulk_create(
                [
                    Message(conversation=conversation, role=message["role"], content=message["content"])
                    for message in template.starter_messages
                ]
            )
            message_chain(conversation=conversation, messages=messages)
    except IntegrityError:  # the template was deleted meanwhile (foreign keys are checked at commit)
        raise NotFoundError("Template not found.", code="template_not_found") from None
    return conversation
