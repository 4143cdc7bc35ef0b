"""Request and response shapes of the organization administration endpoints (``accounts.organizations.apis``)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.validators import UnicodeUsernameValidator
from rest_framework import serializers

from chatbackend.fields import ID_MAX, StrictCharField

from ..lifecycle.serializers import _StrictEmailField
from ..models import Invitation, Membership, Organization, Team, TeamMembership, User
from ..serializers import _password_min_length


class _StrictSlugField(serializers.SlugField):
    """A JSON string that is a slug (letters, digits, ``-`` and ``_``); numbers and the like are 400."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class _StrictIntegerField(serializers.IntegerField):
    """A JSON integer (a string holding digits, a float, a boolean are 400)."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


def _id_field(**kwargs: Any) -> _StrictIntegerField:
    return _StrictIntegerField(min_value=1, max_value=ID_MAX, **kwargs)


class OrganizationOutputSerializer(serializers.ModelSerializer):
    """An organization the caller belongs to, with their ``role`` in it."""

    role = serializers.ChoiceField(choices=Membership.Role.choices, read_only=True)
    is_default = serializers.BooleanField(
        read_only=True, help_text="the organization requests act in when they name none"
    )

    class Meta:
        model = Organization
        fields = ["id", "name", "slug", "role", "is_default", "created_at"]
        read_only_fields = fields


class MemberOutputSerializer(serializers.ModelSerializer):
    """A member of the organization: the user and their role (emails: ``GET /api/users/``, admins only)."""

    user_id = serializers.IntegerField(read_only=True)
    username = serializers.CharField(source="user.username", read_only=True)
    joined_at = serializers.DateTimeField(source="created_at", read_only=True)

    class Meta:
        model = Membership
        fields = ["user_id", "username", "role", "joined_at"]
        read_only_fields = fields


class MemberUpdateInputSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=Membership.Role.choices)


class TeamMemberOutputSerializer(serializers.ModelSerializer):
    """A member of a team."""

    user_id = serializers.IntegerField(read_only=True)
    username = serializers.CharField(source="user.username", read_only=True)
    joined_at = serializers.DateTimeField(source="created_at", read_only=True)

    class Meta:
        model = TeamMembership
        fields = ["user_id", "username", "joined_at"]
        read_only_fields = fields


class TeamOutputSerializer(serializers.ModelSerializer):
    members = TeamMemberOutputSerializer(source="memberships", many=True, read_only=True)

    class Meta:
        model = Team
        fields = ["id", "name", "slug", "created_at", "members"]
        read_only_fields = fields


class TeamCreateInputSerializer(serializers.Serializer):
    name = StrictCharField(max_length=100)
    slug = _StrictSlugField(
        max_length=64, required=False, help_text="unique in the organization; default: the name, slugified"
    )


class TeamUpdateInputSerializer(serializers.Serializer):
    name = StrictCharField(max_length=100, required=False)
    slug = _StrictSlugField(max_length=64, required=False, help_text="unique in the organization")


class TeamMemberAddInputSerializer(serializers.Serializer):
    user_id = _id_field(help_text="a member of the organization")


class InvitationCreateInputSerializer(serializers.Serializer):
    email = _StrictEmailField(max_length=254)
    role = serializers.ChoiceField(
        choices=Membership.Role.choices, default=Membership.Role.MEMBER, help_text="owner: only by an owner"
    )
    teams = serializers.ListField(
        child=_id_field(), default=list, max_length=100, help_text="ids of the organization's teams to join"
    )


class InvitationOutputSerializer(serializers.ModelSerializer):
    """An invitation (never its token: the emailed link is its only copy)."""

    teams: serializers.PrimaryKeyRelatedField[Team] = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    invited_by: serializers.PrimaryKeyRelatedField[User] = serializers.PrimaryKeyRelatedField(
        read_only=True, allow_null=True
    )

    class Meta:
        model = Invitation
        fields = ["id", "email", "role", "teams", "invited_by", "created_at", "expires_at"]
        read_only_fields = fields


class InvitationAcceptInputSerializer(serializers.Serializer):
    token = StrictCharField(max_length=1024, help_text="the link's token parameter")
    username = StrictCharField(
        max_length=150,
        required=False,
        validators=[UnicodeUsernameValidator()],
        help_text="without a login: the new account's username",
    )
    password = StrictCharField(
        write_only=True,
        required=False,
        trim_whitespace=False,
        min_length=_password_min_length(),
        max_length=4096,
        style={"input_type": "password"},
        help_text="without a login: the new account's password (the server's password validators check it)",
    )


class _InvitationOrganizationOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = Organization
        fields = ["id", "name", "slug"]
        read_only_fields = fields


class InvitationAcceptOutputSerializer(serializers.ModelSerializer):
    """The membership an accepted invitation made."""

    organization = _InvitationOrganizationOutputSerializer(read_only=True)
    user_id = serializers.IntegerField(read_only=True)
    username = serializers.CharField(source="user.username", read_only=True)
    teams = serializers.SerializerMethodField()

    class Meta:
        model = Membership
        fields = ["organization", "user_id", "username", "role", "is_default", "teams"]
        read_only_fields = fields

    def get_teams(self, membership: Membership) -> list[int]:
        """Return the ids of the organization's teams the member is in."""
        return sorted(
            TeamMembership.objects.filter(
                user_id=membership.user_id, team__organization_id=membership.organization_id
            ).values_list("team_id", flat=True)
        )
