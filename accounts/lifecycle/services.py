"""Writes of the account lifecycle: passwords, email verification, deactivation, ending sessions.

Django's auth forms do the password work (``PasswordChangeForm``, ``PasswordResetForm``,
``SetPasswordForm``: the ``AUTH_PASSWORD_VALIDATORS``, the reset token of
``PasswordResetTokenGenerator``); this module turns their verdicts into ``ApplicationError``s and
ends the sessions a new password must end. Emails are sent by Celery tasks
(``accounts.lifecycle.tasks``), queued once the transaction commits; links point at the client's
pages (``settings.PASSWORD_RESET_URL``, ``settings.EMAIL_VERIFICATION_URL``), which POST what the
link carries back to the API.
"""

from __future__ import annotations

import logging
from typing import Any

import jwt
from django.conf import settings
from django.contrib.auth.forms import PasswordChangeForm, PasswordResetForm, SetPasswordForm
from django.contrib.auth.tokens import default_token_generator
from django.core import signing
from django.core.mail import send_mail
from django.db import transaction
from django.forms import Form
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.encoding import force_str
from django.utils.http import urlencode, urlsafe_base64_decode
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken

from chatbackend.errors import ApplicationError, NotFoundError

from ..models import User
from ..revocation import SESSION_CLAIM, revocation_announce

logger = logging.getLogger(__name__)

# Namespaces the signature of email verification tokens: a value signed for anything else fails.
EMAIL_VERIFICATION_SALT = "accounts.lifecycle.email_verification"
# Template names, not secrets (ruff's S105 sees "PASSWORD" in the names).
PASSWORD_RESET_SUBJECT_TEMPLATE = "accounts/email/password_reset_subject.txt"  # noqa: S105
PASSWORD_RESET_EMAIL_TEMPLATE = "accounts/email/password_reset.txt"  # noqa: S105
EMAIL_VERIFICATION_SUBJECT = "Verify your email address"
EMAIL_VERIFICATION_EMAIL_TEMPLATE = "accounts/email/email_verification.txt"
INVALID_LINK_MESSAGE = "The link is invalid or has expired; ask for a new one."


def _form_error(form: Form, names: dict[str, str]) -> ApplicationError:
    """Return a 400 naming the first invalid field of a Django auth ``form`` by its API name.

    ``names`` maps the form's field names to the API's (``new_password1`` -> ``new_password``);
    the code is the validator's (``password_incorrect``, ``password_too_short``, ...), ``fields``
    every invalid field's messages.
    """
    errors = form.errors.as_data()
    fields = {names.get(name, name): [m for error in errs for m in error.messages] for name, errs in errors.items()}
    name, errs = next(iter(errors.items()))
    param = names.get(name, name)
    return ApplicationError(
        f"{param}: {errs[0].messages[0]}", code=errs[0].code or "invalid", param=param, fields=fields
    )


def _no_local_password() -> ApplicationError:
    return ApplicationError(
        "This account has no password to change: it signs in another way (API keys, single sign-on).",
        code="password_not_set",
        param="old_password",
    )


# --- Sessions ----------------------------------------------------------------------------------


def user_sessions_end(*, user: User) -> int:
    """End every JWT login of ``user``: blacklist its refresh tokens and close its logins' WebSockets.

    Each refresh token simplejwt issued to ``user`` and not yet expired (``OutstandingToken``,
    written for every login and every rotation) is blacklisted, so no login can be refreshed; the
    WebSockets opened with a JWT of the user close with 4401 in every process
    (``accounts.revocation``, ``session_user_ids``), and the login sessions of those refresh tokens
    (their ``sid`` claim) are marked ended, so their access tokens stop authenticating too
    (``accounts.revocation.jwt_session_check``). API keys and what they opened are untouched.
    Returns how many refresh tokens were blacklisted.
    """
    outstanding = OutstandingToken.objects.filter(
        user=user, expires_at__gt=timezone.now(), blacklistedtoken__isnull=True
    )
    count = 0
    sessions: list[str] = []
    for token in outstanding:
        _, created = BlacklistedToken.objects.get_or_create(token=token)
        count += created
        session = _session_of(token.token)
        if session is not None:
            sessions.append(session)
    revocation_announce(sessions=sessions, session_user_ids=[user.pk])
    return count


def _session_of(refresh_token: str) -> str | None:
    """Return the login session (``sid`` claim) of a refresh token this server issued and stored
    (``OutstandingToken.token``), without checking it again (it may have expired meanwhile)."""
    try:
        session = jwt.decode(refresh_token, options={"verify_signature": False}).get(SESSION_CLAIM)
    except jwt.InvalidTokenError:
        return None
    return session if isinstance(session, str) else None


# --- Password change ---------------------------------------------------------------------------


def password_change(*, user: User, old_password: str, new_password: str) -> User:
    """Set ``user``'s password to ``new_password`` after checking ``old_password``; end their other logins.

    Raises ``ApplicationError`` 400: ``old_password`` wrong (``password_incorrect``) or unset
    (``password_not_set``, an account without a local password), ``new_password`` refused by
    the password validators (their code, e.g. ``password_too_common``). Every refresh token of the
    user is blacklisted and its sessions' WebSockets close (``user_sessions_end``); API keys keep
    working. The caller gets a new login from the interface.
    """
    if not user.has_usable_password():
        raise _no_local_password()
    form = PasswordChangeForm(
        user, data={"old_password": old_password, "new_password1": new_password, "new_password2": new_password}
    )
    if not form.is_valid():
        raise _form_error(form, {"new_password1": "new_password", "new_password2": "new_password"})
    with transaction.atomic():
        form.save()
        user_sessions_end(user=user)
    return user


# --- Password reset ----------------------------------------------------------------------------


def password_reset_request(*, email: str) -> None:
    """Queue the password reset email for ``email``; the same whether an account has it or not.

    The task (``accounts.password_reset_send``) sends ``password_reset_send``'s email; the answer
    never says, nor takes longer to say, whether the address is known.
    """
    from .tasks import password_reset_send_task

    transaction.on_commit(lambda: password_reset_send_task.delay(email))


def password_reset_send(*, email: str) -> int:
    """Email a reset link to each active account of ``email`` (case-insensitive) that has a password.

    Django's ``PasswordResetForm`` finds the accounts and makes each link's ``uid`` (the user's
    id, base64) and ``token`` (``PasswordResetTokenGenerator``: valid ``PASSWORD_RESET_TIMEOUT``
    seconds, and only until the password changes or the user logs in); the link is
    ``PASSWORD_RESET_URL?uid=...&token=...``. Accounts without a local password (single sign-on)
    get none. Returns how many emails were sent (0 for an unknown address).
    """
    form = PasswordResetForm(data={"email": email})
    if not form.is_valid():  # not an email address: nobody has it
        return 0
    users = list(form.get_users(email))
    form.save(
        domain_override=settings.PASSWORD_RESET_URL,
        subject_template_name=PASSWORD_RESET_SUBJECT_TEMPLATE,
        email_template_name=PASSWORD_RESET_EMAIL_TEMPLATE,
        extra_email_context={"reset_base_url": settings.PASSWORD_RESET_URL},
    )
    return len(users)


def password_reset_confirm(*, uid: str, token: str, new_password: str) -> User:
    """Set the password of the account a reset link names, if its ``token`` is still valid.

    Raises ``ApplicationError`` 400 ``invalid_link`` (param ``token``) for an unknown ``uid``, an
    inactive account, or a token that is wrong, expired or used already (a password change or a
    login since makes it stale); 400 naming ``new_password`` when the validators refuse it. Every
    login of the user ends (``user_sessions_end``), and the email counts as verified: the link
    reached it.
    """
    try:
        user = User.objects.get(pk=int(force_str(urlsafe_base64_decode(uid))))
    except (ValueError, TypeError, OverflowError, User.DoesNotExist):
        user = None
    if user is None or not user.is_active or not default_token_generator.check_token(user, token):
        raise ApplicationError(INVALID_LINK_MESSAGE, code="invalid_link", param="token")
    form = SetPasswordForm(user, data={"new_password1": new_password, "new_password2": new_password})
    if not form.is_valid():
        raise _form_error(form, {"new_password1": "new_password", "new_password2": "new_password"})
    with transaction.atomic():
        user = form.save(commit=False)
        user.email_verified = True
        user.save()
        user_sessions_end(user=user)
    return user


# --- Email verification ------------------------------------------------------------------------


def email_verification_token(*, user: User) -> str:
    """Return a signed, timestamped token that verifies ``user``'s current email address.

    ``django.core.signing`` (HMAC with ``SECRET_KEY``, salted): it holds the user's id and email,
    so a token stops working when the email changes; ``email_verify`` accepts it for
    ``EMAIL_VERIFICATION_MAX_AGE_SECONDS``.
    """
    return signing.dumps({"user": user.pk, "email": user.email}, salt=EMAIL_VERIFICATION_SALT, compress=True)


def email_verification_request(*, user: User) -> None:
    """Queue the verification email of ``user`` (``accounts.email_verification_send``) once the transaction commits."""
    from .tasks import email_verification_send_task

    user_id = user.pk
    transaction.on_commit(lambda: email_verification_send_task.delay(user_id))


def email_verification_resend(*, email: str) -> None:
    """Queue a new verification email for each unverified active account of ``email``; silent otherwise.

    The answer is the same whether or not an account has that address.
    """
    for user in User.objects.filter(email__iexact=email, email_verified=False, is_active=True):
        email_verification_request(user=user)


def email_verification_send(*, user_id: int) -> bool:
    """Email ``user_id`` the link ``EMAIL_VERIFICATION_URL?token=...``; False when there is nothing to send.

    Nothing is sent to a deleted, inactive or already verified user, nor to one without an email.
    """
    user = User.objects.filter(pk=user_id, is_active=True, email_verified=False).exclude(email="").first()
    if user is None:
        return False
    link = f"{settings.EMAIL_VERIFICATION_URL}?{urlencode({'token': email_verification_token(user=user)})}"
    body = render_to_string(EMAIL_VERIFICATION_EMAIL_TEMPLATE, {"user": user, "link": link})
    send_mail(EMAIL_VERIFICATION_SUBJECT, body, None, [user.email])
    return True


def email_verify(*, token: str) -> User:
    """Mark the email of the user a verification ``token`` names as verified (idempotent).

    Raises ``ApplicationError`` 400 ``invalid_link`` (param ``token``) for a token that is not
    ours, names a deleted user or an email the user no longer has, or is older than
    ``EMAIL_VERIFICATION_MAX_AGE_SECONDS`` (``link_expired``).
    """
    try:
        data: Any = signing.loads(
            token, salt=EMAIL_VERIFICATION_SALT, max_age=settings.EMAIL_VERIFICATION_MAX_AGE_SECONDS
        )
    except signing.SignatureExpired:
        raise ApplicationError(INVALID_LINK_MESSAGE, code="link_expired", param="token") from None
    except signing.BadSignature:
        raise ApplicationError(INVALID_LINK_MESSAGE, code="invalid_link", param="token") from None
    user_id = data.get("user") if isinstance(data, dict) else None
    user = User.objects.filter(pk=user_id).first() if isinstance(user_id, int) else None
    if user is None or user.email != data.get("email"):
        raise ApplicationError(INVALID_LINK_MESSAGE, code="invalid_link", param="token")
    if not user.email_verified:
        user.email_verified = True
        user.save(update_fields=["email_verified"])
    return user


# --- Deactivation ------------------------------------------------------------------------------


def _user_for_admin(*, actor: User, user_id: int) -> User:
    """Return user ``user_id`` for an admin ``actor`` to manage; 403 for a member, 404 for no such user."""
    if not actor.is_admin:
        raise ApplicationError("Only admins may deactivate or reactivate users.", code="permission_denied", status=403)
    try:
        user = User.objects.get(pk=user_id)
    except User.DoesNotExist:
        raise NotFoundError("User not found.", code="user_not_found") from None
    if user.is_superuser and not actor.is_superuser:
        raise ApplicationError("Only a superuser may deactivate a superuser.", code="permission_denied", status=403)
    return user


def user_deactivate(*, actor: User, user_id: int) -> User:
    """Deactivate user ``user_id``: nothing of theirs authenticates any more, in any process; their data stays.

    Admins only (``ApplicationError`` 403 ``permission_denied``; a superuser only by a superuser),
    404 ``user_not_found``, 400 ``cannot_deactivate_self``. Idempotent. ``is_active`` becomes False
    through ``save()``, whose signals clear every process's cached principals (``lookup_cache``)
    and end what the user has open — WebSockets close with 4401, streaming replies stop
    (``accounts.revocation``); authentication refuses their API keys and JWTs (401
    ``user_inactive``) and their refresh tokens are blacklisted (``user_sessions_end``), so a later
    reactivation needs a new login. Their API keys are not revoked: they work again after
    ``user_reactivate``.
    """
    user = _user_for_admin(actor=actor, user_id=user_id)
    if user.pk == actor.pk:
        raise ApplicationError("You cannot deactivate your own account.", code="cannot_deactivate_self")
    if user.is_active:
        with transaction.atomic():
            user.is_active = False
            user.save(update_fields=["is_active"])
            user_sessions_end(user=user)
        logger.info("user %s deactivated by %s", user.pk, actor.pk)
    return user


def user_reactivate(*, actor: User, user_id: int) -> User:
    """Reactivate user ``user_id``: their API keys work again, they may log in. Admins only; idempotent.

    Errors as ``user_deactivate``'s (403, 404).
    """
    user = _user_for_admin(actor=actor, user_id=user_id)
    if not user.is_active:
        user.is_active = True
        user.save(update_fields=["is_active"])
        logger.info("user %s reactivated by %s", user.pk, actor.pk)
    return user
