"""The admin action "Test connection": a one-token call through the provider's adapter, to the simulator
over real HTTP, reported as latency or the upstream's error, never with the provider's key."""

from __future__ import annotations

import html
import re

import pytest

from llm.models import Provider
from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import SIMULATOR_API_KEY

pytestmark = pytest.mark.django_db

WRONG_KEY = "sk-wrong-provider-key-0123456789abcdef"
OK_MESSAGE = re.compile(r": connected, one-token reply in \d+ ms\.$")


def base_url_for(kind: str, sim) -> str:
    """The provider base URL of ``kind`` at ``sim``: OpenAI-compatible with /v1, the others at the root."""
    return sim.base_url if kind == Provider.Kind.OPENAI else sim.root_url


def run_action(admin_site, changelist: str, action: str, *pks: int) -> tuple[list[tuple[str, str]], str]:
    """POST the changelist ``action`` for rows ``pks``; return the (level, text) messages and the page shown."""
    response = admin_site.post(changelist, {"action": action, "_selected_action": [str(pk) for pk in pks]}, follow=True)
    assert response.status_code == 200
    reported = [(message.level_tag, message.message) for message in response.context["messages"]]
    return reported, response.content.decode()


@pytest.mark.parametrize("kind", Provider.Kind.values)
def test_each_provider_kind_connects_and_reports_its_latency(admin_site, keyed_simulator, kind):
    provider = ProviderFactory(
        name=f"sim-{kind}", kind=kind, base_url=base_url_for(kind, keyed_simulator), api_key=SIMULATOR_API_KEY
    )
    LLMModelFactory(name=f"{kind}-model", provider=provider, upstream_model="sim-1")
    before = keyed_simulator.stats()

    reported, page = run_action(admin_site, "/admin/llm/provider/", "test_connection", provider.pk)

    [(level, text)] = reported
    assert level == "success", text
    assert text.startswith(f"Provider 'sim-{kind}' (model 'sim-1')") and OK_MESSAGE.search(text), text
    assert html.escape(text) in page  # shown on the changelist the action returns to
    assert SIMULATOR_API_KEY not in page
    after = keyed_simulator.stats()
    assert after["requests_completed"] == before["requests_completed"] + 1  # one call, to the end


@pytest.mark.parametrize(
    ("kind", "upstream_says"),
    [
        (Provider.Kind.OPENAI, "answered 401: "),
        (Provider.Kind.ANTHROPIC, "answered 401: "),
        (Provider.Kind.GEMINI, "API_KEY_INVALID"),
        (Provider.Kind.AZURE_OPENAI, "Access denied due to invalid subscription key"),
    ],
)
def test_a_wrong_key_shows_the_upstreams_error_and_never_the_key(admin_site, keyed_simulator, kind, upstream_says):
    provider = ProviderFactory(
        name=f"sim-{kind}", kind=kind, base_url=base_url_for(kind, keyed_simulator), api_key=WRONG_KEY
    )
    LLMModelFactory(name=f"{kind}-model", provider=provider, upstream_model="sim-1")

    reported, page = run_action(admin_site, "/admin/llm/provider/", "test_connection", provider.pk)

    [(level, text)] = reported
    assert level == "error"
    assert re.match(rf"Provider 'sim-{kind}' \(model 'sim-1'\): failed after \d+ ms: ", text), text
    assert upstream_says in text  # the upstream's own words, for the operator
    assert WRONG_KEY not in text and WRONG_KEY not in page  # the simulator echoes a wrong OpenAI key: redacted
    assert SIMULATOR_API_KEY not in page


def test_the_model_action_tests_each_selected_model(admin_site, simulator, closed_port_url):
    provider = ProviderFactory(name="sim-fast", base_url=simulator.base_url, api_key="")
    good = LLMModelFactory(name="good", provider=provider, upstream_model="sim-1")
    failing = LLMModelFactory(name="failing", provider=provider, upstream_model="sim-error-500")
    nowhere = LLMModelFactory(name="nowhere", provider=ProviderFactory(name="closed", base_url=closed_port_url))

    reported, _page = run_action(admin_site, "/admin/llm/llmmodel/", "test_connection", good.pk, failing.pk, nowhere.pk)

    by_model = {re.match(r"Model '([^']+)'", text).group(1): (level, text) for level, text in reported}
    assert by_model["good"][0] == "success" and OK_MESSAGE.search(by_model["good"][1])
    assert by_model["failing"][0] == "error"
    assert "The model provider failed to answer. (status 500)" in by_model["failing"][1]
    assert "answered 500" in by_model["failing"][1]
    assert by_model["nowhere"][0] == "error"
    assert "The model provider could not be reached." in by_model["nowhere"][1]


def test_a_provider_without_models_is_told_what_is_missing(admin_site, simulator):
    provider = ProviderFactory(name="empty", base_url=simulator.base_url)

    reported, _page = run_action(admin_site, "/admin/llm/provider/", "test_connection", provider.pk)

    assert reported == [
        ("warning", "Provider 'empty': no model to test with; add a model (its upstream model id) first.")
    ]


def test_the_action_is_for_staff_only(client, provider):
    response = client.post("/admin/llm/provider/", {"action": "test_connection", "_selected_action": [provider.pk]})

    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_an_upstream_that_hangs_is_reported_after_its_read_timeout(admin_site, sleepy_simulator):
    provider = ProviderFactory(name="sleepy", base_url=sleepy_simulator.base_url, api_key="", read_timeout=0.5)
    LLMModelFactory(name="sleepy-model", provider=provider, upstream_model="sim-1")

    reported, _page = run_action(admin_site, "/admin/llm/provider/", "test_connection", provider.pk)

    [(level, text)] = reported
    assert level == "error"
    assert "The model provider did not answer in time." in text, text
    latency_ms = int(re.search(r"failed after (\d+) ms", text).group(1))
    assert 500 <= latency_ms < 5000  # the provider's read timeout, not the simulator's 5 s
