"""Request and response shapes of the account lifecycle endpoints (``accounts.lifecycle.apis``)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from chatbackend.fields import StrictCharField

from ..serializers import _password_min_length


class _StrictEmailField(serializers.EmailField):
    """A JSON string holding an email address (numbers, booleans... are 400)."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


def _new_password_field() -> StrictCharField:
    # min_length: the validators' length rule, stated in the schema too (as at registration).
    return StrictCharField(
        write_only=True,
        trim_whitespace=False,
        min_length=_password_min_length(),
        max_length=4096,
        style={"input_type": "password"},
        help_text="checked by the server's password validators",
    )


class PasswordChangeInputSerializer(serializers.Serializer):
    old_password = StrictCharField(write_only=True, trim_whitespace=False, max_length=4096)
    new_password = _new_password_field()


class PasswordResetInputSerializer(serializers.Serializer):
    email = _StrictEmailField(max_length=254)


class PasswordResetConfirmInputSerializer(serializers.Serializer):
    uid = StrictCharField(max_length=64, help_text="the link's uid parameter")
    token = StrictCharField(max_length=128, help_text="the link's token parameter")
    new_password = _new_password_field()


class EmailVerifyInputSerializer(serializers.Serializer):
    token = StrictCharField(max_length=1024, help_text="the link's token parameter")


class EmailVerificationResendInputSerializer(serializers.Serializer):
    email = _StrictEmailField(max_length=254)


class LifecycleAcceptedOutputSerializer(serializers.Serializer):
    """What an email-sending endpoint answers, whether or not an account has the address."""

    detail = serializers.CharField()
