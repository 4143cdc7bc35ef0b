"""The per-process lookup caches (``chatbackend.lookup_cache``) as a client sees them, in one process.

API keys, JWT users and enabled models are answered from memory once looked up: no query, no
worker-thread hop. Any change — a key revoked through the API, a user deactivated, a model or
provider disabled or repriced — is seen by the very next request, a lookup racing a revocation
never caches the pre-revocation result, and ``RESYNC`` (a listener that lost its channel layer)
drops everything. Requests go through Django's ASGI handler; the upstream is the simulator. Runs
on the embedded defaults (in-memory channel layer, SQLite) and on PostgreSQL + Redis alike;
``tests/test_e2e_lookup_cache.py`` checks invalidation across processes.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections
from django.db.backends.signals import connection_created
from django.test import AsyncClient
from rest_framework_simplejwt.tokens import AccessToken

from accounts.authentication import authenticate_token_async
from accounts.models import APIKey
from accounts.selectors import AuthenticationFailed
from accounts.services import api_key_create, api_key_revoke
from chatbackend import broadcast
from chatbackend.asyncdb import run_sync
from llm.models import LLMModel, Provider
from tests.factories import ConversationFactory
from tests.kit import access_token, assert_error, bearer, chat_body, poll_until, post_chat, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # What the requests leave behind: asgiref's thread-sensitive connection (Django's test client
    # keeps it open across DRF requests), the provider's HTTP client, this loop's broadcast listener.
    pytest.mark.usefixtures("provider_clients", "broadcast_listener"),
]
# The per-request lookups, as SQL: an API key by digest, a JWT's user by id, a model by name (with
# its provider). A request answered from the caches runs none of them. (The usage accounting that
# follows a reply reads by id lists and writes: not a lookup.)
KEY_LOOKUP = '"accounts_apikey"."key_hash" ='
USER_LOOKUP = 'FROM "accounts_user" WHERE "accounts_user"."id" ='
MODEL_LOOKUP = '"llm_llmmodel"."name" ='
LOOKUPS = (KEY_LOOKUP, USER_LOOKUP, MODEL_LOOKUP)


class QueryLog:
    """The SQL statements that every thread of this process runs while the log is open.

    Django's execute wrappers, added to each connection opened meanwhile (``run_sync`` opens one
    per hop and closes it after, so every hop's queries are seen).
    """

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.open = False
        self._lock = threading.Lock()

    def __enter__(self) -> QueryLog:
        self.open = True
        connection_created.connect(self._wrap, dispatch_uid=id(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self.open = False
        connection_created.disconnect(dispatch_uid=id(self))

    def _wrap(self, sender: Any, connection: Any, **kwargs: Any) -> None:
        connection.execute_wrappers.append(self._record)

    def _record(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        if self.open:
            with self._lock:
                self.statements.append(sql)
        return execute(sql, params, many, context)

    def matching(self, *fragments: str) -> list[str]:
        """Return the statements that contain one of ``fragments``."""
        return [sql for sql in self.statements if any(fragment in sql for fragment in fragments)]


async def chat(token: str, model: str = "sim-model", **fields: Any) -> Any:
    """POST a one-message, non-streamed chat completion through the ASGI app; return the response."""
    return await post_chat(AsyncClient(), chat_body(model, **fields), bearer(token))


# --- Hits: no query, no hop -------------------------------------------------------------------


async def test_a_cached_key_and_model_answer_without_touching_the_database(user, sim_model, api_key_secret):
    first = await chat(api_key_secret)
    assert first.status_code == 200, first.content

    with QueryLog() as log:
        second = await chat(api_key_secret)
        principal = await authenticate_token_async(api_key_secret)
        again = await authenticate_token_async(api_key_secret)

    assert second.status_code == 200, second.content
    assert json.loads(second.content)["model"] == "sim-model"
    assert log.matching(*LOOKUPS) == []
    assert again is principal and principal.user.pk == user.pk
    records = await usage_records()
    assert [record.api_key_id for record in records] == [principal.api_key.pk] * 2  # type: ignore[union-attr]


async def test_a_jwt_is_checked_on_every_request_but_its_user_is_read_once(user, sim_model):
    token = access_token(user)
    assert (await chat(token)).status_code == 200

    with QueryLog() as log:
        assert (await chat(token)).status_code == 200
        expired = AccessToken.for_user(user)
        expired.set_exp(lifetime=-dt.timedelta(minutes=1))
        refused = await chat(str(expired))

    assert log.matching(*LOOKUPS) == []
    assert_error(refused, 401, code="token_not_valid")  # the signature and expiry, checked per request


async def test_a_cached_key_still_records_when_it_was_last_used(user, sim_model, api_key_secret, settings):
    settings.API_KEY_LAST_USED_RESOLUTION_SECONDS = 0  # every use is worth writing
    assert (await chat(api_key_secret)).status_code == 200
    key = await run_sync(APIKey.objects.get, user=user)
    assert key.last_used_at is not None

    assert (await chat(api_key_secret)).status_code == 200  # a hit: written off the request's path

    await poll_until(
        lambda: run_sync(lambda: APIKey.objects.get(pk=key.pk).last_used_at),
        lambda last_used_at: last_used_at > key.last_used_at,
    )


# --- Changes are seen by the very next request --------------------------------------------------


async def test_a_key_revoked_through_the_api_is_refused_on_the_next_request(user, sim_model, api_key_secret):
    assert (await chat(api_key_secret)).status_code == 200
    key = await run_sync(APIKey.objects.get, user=user)

    revoked = await AsyncClient().delete(f"/api/api-keys/{key.pk}/", headers=bearer(access_token(user)))
    assert revoked.status_code == 204

    assert_error(await chat(api_key_secret), 401, code="api_key_revoked")


async def test_a_deactivated_user_is_refused_on_the_next_request(user, sim_model, api_key_secret):
    token = access_token(user)
    assert (await chat(token)).status_code == 200
    assert (await chat(api_key_secret)).status_code == 200

    def deactivate() -> None:  # what the admin does
        user.is_active = False
        user.save()

    await run_sync(deactivate)

    assert (await chat(token)).status_code == 401
    assert_error(await chat(api_key_secret), 401, code="user_inactive")


async def test_a_login_does_not_clear_the_caches(user, sim_model, api_key_secret, password):
    assert (await chat(api_key_secret)).status_code == 200
    login = await AsyncClient().post(
        "/api/auth/token/", data={"username": user.username, "password": password}, content_type="application/json"
    )
    assert login.status_code == 200  # writes last_login (a save of the user)

    with QueryLog() as log:
        assert (await chat(api_key_secret)).status_code == 200
    assert log.matching(*LOOKUPS) == []


@pytest.mark.parametrize("disable", ["model", "provider"])
async def test_a_disabled_model_or_provider_is_refused_on_the_next_request(sim_model, api_key_secret, disable):
    assert (await chat(api_key_secret)).status_code == 200

    def switch_off() -> None:  # what the admin does
        row: LLMModel | Provider = sim_model if disable == "model" else sim_model.provider
        row.enabled = False
        row.save()

    await run_sync(switch_off)

    assert_error(await chat(api_key_secret), 400, code="model_disabled")


async def test_a_new_price_is_charged_from_the_next_reply(sim_model, api_key_secret):
    assert (await chat(api_key_secret)).status_code == 200

    def reprice() -> None:
        sim_model.input_price_per_million = Decimal("1000")
        sim_model.output_price_per_million = Decimal("3000")
        sim_model.save()

    await run_sync(reprice)
    assert (await chat(api_key_secret)).status_code == 200

    old, new = await usage_records()
    assert old.cost == (old.prompt_tokens * 1 + old.completion_tokens * 2) / Decimal(1_000_000)
    assert new.cost == (new.prompt_tokens * 1000 + new.completion_tokens * 3000) / Decimal(1_000_000)


async def test_a_resync_drops_every_cached_lookup(sim_model, api_key_secret):
    assert (await chat(api_key_secret)).status_code == 200

    # What the listener dispatches when it receives again after losing its channel layer.
    broadcast.dispatch({"type": broadcast.RESYNC})

    with QueryLog() as log:
        assert (await chat(api_key_secret)).status_code == 200
    assert log.matching(KEY_LOOKUP) and log.matching(MODEL_LOOKUP)


# --- The race: a revocation while a lookup is in flight ----------------------------------------


@contextmanager
def after_first_read_of(table: str, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` in another thread, and wait for it, right after the first read of ``table``.

    The reading thread is held meanwhile: its lookup has read the row but not returned yet.
    """
    armed = threading.Event()
    armed.set()

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        if armed.is_set() and sql.startswith("SELECT") and f'"{table}"' in sql:
            armed.clear()
            thread = threading.Thread(target=action)
            thread.start()
            thread.join(30)
        return result

    def wrap(sender: Any, connection: Any, **kwargs: Any) -> None:
        connection.execute_wrappers.append(wrapper)

    connection_created.connect(wrap, dispatch_uid="after_first_read_of")
    try:
        yield
    finally:
        connection_created.disconnect(dispatch_uid="after_first_read_of")
    assert not armed.is_set(), f"nothing read {table}"


async def test_a_revocation_during_an_in_flight_lookup_is_not_undone_by_its_result(user, sim_model):
    secret = (await run_sync(api_key_create, user=user, name="racing")).secret
    await broadcast.listen()  # so that the lookup may cache what it read
    revoked = threading.Event()

    def revoke() -> None:
        try:
            key = APIKey.objects.get(user=user, name="racing")
            api_key_revoke(user=user, api_key_id=key.pk)
            revoked.set()
        finally:
            connections.close_all()

    with after_first_read_of("accounts_apikey", revoke):
        # Read before the revocation: this request is let in, as it would have been a moment earlier.
        principal = await authenticate_token_async(secret)
    assert revoked.is_set()
    assert principal.api_key is not None and principal.api_key.revoked_at is None

    # ...but what it read must not outlive the revocation.
    with pytest.raises(AuthenticationFailed) as refused:
        await authenticate_token_async(secret)
    assert refused.value.code == "api_key_revoked"


async def test_a_conversation_reply_reads_its_model_from_the_cache(user, sim_model, api_key_secret):
    conversation = await run_sync(ConversationFactory, owner=user, model=sim_model)
    url = f"/api/conversations/{conversation.pk}/messages/"
    client = AsyncClient()

    async def send(content: str) -> None:
        response = await client.post(
            url, data=json.dumps({"content": content}), content_type="application/json", headers=bearer(api_key_secret)
        )
        assert response.status_code == 201, response.content

    await send("first")
    with QueryLog() as log:
        await send("second")
    assert log.matching(MODEL_LOOKUP) == []  # the model and its provider came from the cache
