"""The provider registry: ``settings.LLM_PROVIDER_BACKENDS`` is loaded and checked at start-up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from llm.models import Provider
from llm.providers import ProviderConfig, get_provider, load_provider_backends
from llm.providers.openai_compatible import OpenAICompatibleProvider
from tests.kit import run_python

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_registry():
    yield
    load_provider_backends(required_kinds=Provider.Kind.values)


def test_every_provider_kind_has_a_loaded_backend():
    assert isinstance(get_provider(ProviderConfig(kind="openai", base_url="http://x/v1")), OpenAICompatibleProvider)
    assert set(load_provider_backends(required_kinds=Provider.Kind.values)) >= set(Provider.Kind.values)


@pytest.mark.parametrize(
    ("backends", "message"),
    [
        ({"openai": "llm.providers.no_such_module.Adapter"}, "does not import"),
        ({"openai": "llm.providers.openai_compatible.NoSuchClass"}, "does not import"),
        ({"openai": "decimal.Decimal"}, "is not a subclass of llm.providers.ChatProvider"),
        ({}, "no backend for the provider kind(s) 'openai'"),
    ],
)
def test_a_bad_backend_map_is_improperly_configured(backends, message):
    with pytest.raises(ImproperlyConfigured, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_provider_backends(backends, required_kinds=Provider.Kind.values)


def test_a_bad_backend_path_stops_start_up(tmp_path):
    # A settings module that is the project's with one bad backend path: django.setup() must fail.
    (tmp_path / "bad_backend_settings.py").write_text(
        "from chatbackend.settings import *  # noqa: F403\n"
        'LLM_PROVIDER_BACKENDS = {"openai": "llm.providers.no_such_module.Adapter"}\n'
    )
    env = {"DJANGO_SETTINGS_MODULE": "bad_backend_settings", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = run_python("manage.py", "check", env=env)

    assert result.returncode == 1, result.stderr  # the ImproperlyConfigured, not another failure
    assert "ImproperlyConfigured" in result.stderr
    assert "LLM_PROVIDER_BACKENDS['openai'] = 'llm.providers.no_such_module.Adapter' does not import" in result.stderr
