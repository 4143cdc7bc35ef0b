"""The Django admin's usage summary page and CSV exports, as an operator uses them."""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal
from html.parser import HTMLParser

import pytest

from accounts.models import UsageRecord
from accounts.services import api_key_create
from tests.factories import usage_record_at

pytestmark = pytest.mark.django_db

SUMMARY = "/admin/accounts/usagerecord/summary/"
MARCH = {"start_date": "2026-03-01", "end_date": "2026-04-01"}


def at(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso).replace(tzinfo=dt.UTC)


@pytest.fixture
def records(user, other_user) -> list[UsageRecord]:
    """Three March records of ``user`` (one refused) and one of ``other_user``; the first read 60 prompt
    tokens from the provider's cache, wrote 10 to it and spent 20 completion tokens reasoning."""
    key = api_key_create(user=user, name="laptop").api_key
    breakdown = {"cached_tokens": 60, "cache_creation_tokens": 10, "reasoning_tokens": 20}
    rows = [
        (user, key, "2026-03-01T10:00:00", 100, 50, "0.001", "completed", breakdown),
        (user, None, "2026-03-02T10:00:00", 10, 5, "0.0002", "cancelled", {}),
        (user, key, "2026-03-02T11:00:00", 0, 0, "0", "refused", {}),
        (other_user, None, "2026-03-05T10:00:00", 1000, 0, "0.25", "completed", {}),
    ]
    return [
        usage_record_at(
            at(when),
            user=owner,
            api_key=api_key,
            model_name="alpha",
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost=Decimal(cost),
            finish_status=status,
            **details,
        )
        for owner, api_key, when, prompt, completion, cost, status, details in rows
    ]


def csv_rows(response) -> list[list[str]]:
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"].startswith("attachment;")
    return list(csv.reader(io.StringIO(response.content.decode("utf-8"))))


def test_the_changelist_links_to_the_summary(admin_site):
    page = admin_site.get("/admin/accounts/usagerecord/")

    assert page.status_code == 200
    assert SUMMARY in page.content.decode()


def test_the_summary_page_shows_every_users_usage(admin_site, user, other_user, records):
    page = admin_site.get(SUMMARY, {**MARCH, "group_by": ["user"]})

    assert page.status_code == 200
    assert page.context["columns"][:2] == ("user_id", "username")
    table = {row[1]: row[2:] for row in page.context["table"]}
    # prompt, completion, total, cached, cache-write, reasoning tokens, cost (USD), requests, refused requests
    assert table == {
        user.username: [110, 55, 165, 60, 10, 20, "0.00120000", 2, 1],
        other_user.username: [1000, 0, 1000, 0, 0, 0, "0.25000000", 1, 0],
    }
    assert "Download CSV" in page.content.decode()


def test_the_summary_page_filters_by_user_and_downloads_csv(admin_site, user, records):
    response = admin_site.get(SUMMARY, {**MARCH, "group_by": ["day"], "user": user.pk, "format": "csv"})

    assert csv_rows(response) == [
        [
            "day",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cached_tokens",
            "cache_creation_tokens",
            "reasoning_tokens",
            "cost",
            "requests",
            "refused_requests",
        ],
        ["2026-03-01", "100", "50", "150", "60", "10", "20", "0.00100000", "1", "0"],
        ["2026-03-02", "10", "5", "15", "0", "0", "0", "0.00020000", "1", "1"],
    ]


def test_the_summary_page_defaults_to_this_month_and_shows_bad_ranges_as_form_errors(admin_site, records):
    page = admin_site.get(SUMMARY)
    assert page.status_code == 200
    assert page.context["columns"][0] == "day"
    assert page.context["table"] == []  # the records are in March 2026, not this month

    page = admin_site.get(SUMMARY, {"start_date": "2026-03-02", "end_date": "2026-03-01"})
    assert page.status_code == 200
    assert page.context["form"].errors["end_date"] == ["end_date must not be before start_date."]
    page = admin_site.get(SUMMARY, {"start_date": "not a date", "group_by": ["week"]})
    assert page.status_code == 200
    assert set(page.context["form"].errors) == {"start_date", "group_by"}


class _BlockInParagraph(HTMLParser):
    """Collect the block elements that open inside a ``<p>``: HTML closes the paragraph before them
    (a ``<p>`` holds phrasing content only), leaving its ``</p>`` stray and the rest outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.open_paragraphs = 0
        self.misplaced: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "p":
            self.open_paragraphs += 1
        elif tag in {"div", "ul", "ol", "table", "p", "fieldset"} and self.open_paragraphs:
            self.misplaced.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self.open_paragraphs:
            self.open_paragraphs -= 1


def test_the_summary_form_is_valid_html(admin_site, records):
    # form.as_p wrapped the group-by checkboxes' <div>s in a <p>: invalid, and the browser moved
    # the help text out of its field.
    page = admin_site.get(SUMMARY, {"start_date": "bad"}).content.decode()
    parser = _BlockInParagraph()
    parser.feed(page)

    assert parser.misplaced == []
    assert 'name="group_by" value="api_key"' in page and "Enter a valid date." in page


def test_the_summary_page_needs_the_admin_site(client, user):
    client.force_login(user)  # not staff

    response = client.get(SUMMARY)

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_the_export_action_downloads_the_selected_records(admin_site, user, records):
    chosen = records[:3]
    response = admin_site.post(
        "/admin/accounts/usagerecord/",
        {"action": "export_csv", "_selected_action": [record.pk for record in chosen]},
    )

    rows = csv_rows(response)
    assert rows[0] == [
        "created_at",
        "request_id",
        "username",
        "api_key_prefix",
        "model_name",
        "source",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "cache_creation_tokens",
        "reasoning_tokens",
        "cost",
        "finish_status",
    ]
    assert [row[1] for row in rows[1:]] == [record.request_id for record in chosen]  # oldest first
    first = rows[1]
    assert first[0] == "2026-03-01T10:00:00+00:00"
    assert first[2:] == [
        user.username,
        chosen[0].api_key.prefix,
        "alpha",
        chosen[0].source,
        "100",
        "50",
        "150",
        "60",
        "10",
        "20",
        "0.00100000",
        "completed",
    ]
    assert rows[3][-1] == "refused"
    # A zero cost reads as the others do (and as the summary's CSV writes it), not as Decimal's "0E-8".
    assert [row[-2] for row in rows[1:]] == ["0.00100000", "0.00020000", "0.00000000"]
