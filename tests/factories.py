"""factory_boy factories shared by every app's tests."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import factory
from factory.django import DjangoModelFactory

from accounts.models import UsageRecord, User
from accounts.usage import usage_cost
from conversations.models import Conversation, Message
from conversations.services import message_append
from llm.models import Deployment, LLMModel, Provider

PASSWORD = "correct-horse-battery-staple"
# ProviderFactory's upstream API key: tests check that it never reaches a response or a log.
UPSTREAM_API_KEY = "sk-upstream-provider-secret-0000000000"


class UserFactory(DjangoModelFactory):
    class Meta:
        model = User
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    role = User.Role.MEMBER
    password = factory.PostGenerationMethodCall("set_password", PASSWORD)

    @factory.post_generation
    def _save(obj, create, extracted, **kwargs):  # noqa: N805 - factory_boy's signature
        if create:
            obj.save()


class ProviderFactory(DjangoModelFactory):
    class Meta:
        model = Provider

    name = factory.Sequence(lambda n: f"provider{n}")
    kind = Provider.Kind.OPENAI
    base_url = "http://127.0.0.1:9/v1"
    api_key = UPSTREAM_API_KEY
    connect_timeout = 2.0
    read_timeout = 10.0


class LLMModelFactory(DjangoModelFactory):
    class Meta:
        model = LLMModel

    name = factory.Sequence(lambda n: f"model-{n}")
    provider = factory.SubFactory(ProviderFactory)
    upstream_model = "sim-1"
    context_window = 8192
    input_price_per_million = "1.000000"
    output_price_per_million = "2.000000"


def simulator_fault_model(*, base_url: str, name: str, fault: str, **fields: Any) -> LLMModel:
    """Return a model named ``name`` whose provider (at the LLM simulator's ``base_url``) asks it for
    ``fault`` on every request (its ``X-Simulator-Fault`` header: ``llm.simulator``); ``fields``: the
    model's other fields (prices, ...)."""
    provider = ProviderFactory(name=f"{name}-provider", base_url=base_url, extra_headers={"X-Simulator-Fault": fault})
    return LLMModelFactory(name=name, provider=provider, **fields)


class DeploymentFactory(DjangoModelFactory):
    class Meta:
        model = Deployment

    model = factory.SubFactory(LLMModelFactory)
    provider = factory.SubFactory(ProviderFactory)
    upstream_model = factory.Sequence(lambda n: f"sim-deployment-{n}")


class ConversationFactory(DjangoModelFactory):
    class Meta:
        model = Conversation

    owner = factory.SubFactory(UserFactory)
    model = factory.SubFactory(LLMModelFactory)
    title = factory.Sequence(lambda n: f"Conversation {n}")


class MessageFactory(DjangoModelFactory):
    class Meta:
        model = Message

    conversation = factory.SubFactory(ConversationFactory)
    role = Message.Role.USER
    content = factory.Sequence(lambda n: f"message {n}")
    status = Message.Status.COMPLETED

    @classmethod
    def _create(cls, model_class: type[Message], *args: Any, **kwargs: Any) -> Message:
        """Append to the conversation's active branch (``message_append``), unless a parent is given."""
        if "parent" in kwargs or "parent_id" in kwargs:
            return super()._create(model_class, *args, **kwargs)
        return message_append(**kwargs)


class UsageRecordFactory(DjangoModelFactory):
    """A usage record as the accounting task writes it, priced at its model's prices (0 without one)."""

    class Meta:
        model = UsageRecord

    request_id = factory.Sequence(lambda n: f"request-{n}")
    user = factory.SubFactory(UserFactory)
    api_key = None
    model = None
    model_name = factory.LazyAttribute(lambda o: o.model.name if o.model else "gone-model")
    message = None
    source = factory.LazyAttribute(
        lambda o: UsageRecord.Source.OPENAI_API if o.api_key else UsageRecord.Source.CONVERSATION
    )
    prompt_tokens = 10
    completion_tokens = 5
    cost = factory.LazyAttribute(
        lambda o: (
            usage_cost(
                prompt_tokens=o.prompt_tokens,
                completion_tokens=o.completion_tokens,
                input_price=Decimal(o.model.input_price_per_million),
                output_price=Decimal(o.model.output_price_per_million),
            )
            if o.model
            else Decimal(0)
        )
    )
    token_source = "provider"
    finish_status = "completed"


def usage_record_at(when: dt.datetime, **fields: Any) -> UsageRecord:
    """Create a ``UsageRecordFactory`` record (with ``fields``) dated ``when`` (aware) instead of now.

    ``created_at`` is ``auto_now_add``: it is set by an update after the insert.
    """
    record: UsageRecord = UsageRecordFactory(**fields)
    UsageRecord.objects.filter(pk=record.pk).update(created_at=when)
    record.created_at = when
    return record
