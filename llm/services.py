"""Writes for providers and models."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from decimal import Decimal

from django.db import transaction

from accounts.models import APIKey, User
from accounts.services import api_key_create, api_key_revoke

from .models import LLMModel, Provider
from .selectors import llm_model_list_enabled

DEMO_PROVIDER_NAME = "simulator"
DEMO_ADMIN_USERNAME = "admin"
DEMO_API_KEY_NAME = "demo"
# (public name, upstream model, input and output US dollars per million tokens). gpt-4o-mini is
# the model NextChat asks for when it generates titles (nextchat.md), priced as OpenAI lists it.
DEMO_MODELS = (
    ("gpt-4o-mini", "sim-1", Decimal("0.15"), Decimal("0.60")),
    ("sim-model", "sim-1", Decimal("0"), Decimal("0")),
)


@dataclass(frozen=True, slots=True)
class DemoSetup:
    """What ``demo_setup`` did.

    ``admin_password``: the admin's password when this call set it (shown once), else None.
    ``api_key``: a fresh ``sk-...`` secret for the admin's ``demo`` key (earlier ones are revoked).
    ``provider_created``: True when the simulator provider and its models were created now.
    ``simulator_in_use``: True when a provider named ``simulator`` points at ``simulator_base_url``.
    ``models``: names of the enabled models on enabled providers.
    """

    admin_username: str
    admin_created: bool
    admin_password: str | None
    api_key: str
    provider_created: bool
    simulator_in_use: bool
    models: list[str]


@transaction.atomic
def demo_setup(*, simulator_base_url: str, simulator_api_key: str, admin_password: str | None = None) -> DemoSetup:
    """Seed a demo installation idempotently; return what was done.

    - A superuser ``admin`` (role ``admin``). Its password is ``admin_password`` when given (set
      on every call), else a random one chosen only when the user is created.
    - An API key ``demo`` for the admin; each call revokes the previous one and returns a new
      secret, since a secret cannot be shown again.
    - When no provider exists at all: a provider ``simulator`` (kind ``openai``) at
      ``simulator_base_url`` (the root including ``/v1``) with ``simulator_api_key``, and the
      models ``gpt-4o-mini`` and ``sim-model`` on it. A ``simulator`` provider that already
      exists is re-pointed at the given URL and key (the simulator's port changes per run);
      other providers are never touched.
    """
    admin = User.objects.filter(username=DEMO_ADMIN_USERNAME).first()
    admin_created = admin is None
    if admin is None:
        admin = User(username=DEMO_ADMIN_USERNAME, email="", role=User.Role.ADMIN)
    password_set: str | None = None
    if admin_created or admin_password:
        password_set = admin_password or secrets.token_urlsafe(12)
        admin.set_password(password_set)
    admin.is_staff = admin.is_superuser = admin.is_active = True
    admin.role = User.Role.ADMIN
    admin.save()

    for old in APIKey.objects.filter(user=admin, name=DEMO_API_KEY_NAME, revoked_at__isnull=True):
        api_key_revoke(user=admin, api_key_id=old.pk)
    secret = api_key_create(user=admin, name=DEMO_API_KEY_NAME).secret

    provider_created = False
    simulator: Provider | None
    if not Provider.objects.exists():
        simulator = Provider.objects.create(
            name=DEMO_PROVIDER_NAME, kind=Provider.Kind.OPENAI, base_url=simulator_base_url, api_key=simulator_api_key
        )
        for name, upstream_model, input_price, output_price in DEMO_MODELS:
            LLMModel.objects.create(
                name=name,
                provider=simulator,
                upstream_model=upstream_model,
                context_window=128_000,
                input_price_per_million=input_price,
                output_price_per_million=output_price,
            )
        provider_created = True
    else:
        simulator = Provider.objects.filter(name=DEMO_PROVIDER_NAME).first()
        if simulator is not None:
            simulator.base_url, simulator.api_key = simulator_base_url, simulator_api_key
            simulator.save(update_fields=["base_url", "api_key", "updated_at"])

    models = list(llm_model_list_enabled().order_by("name").values_list("name", flat=True))
    return DemoSetup(
        admin_username=admin.username,
        admin_created=admin_created,
        admin_password=password_set,
        api_key=secret,
        provider_created=provider_created,
        simulator_in_use=simulator is not None,
        models=models,
    )
