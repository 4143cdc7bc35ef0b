"""GET /api/usage/summary/: usage summed per day, model, user and API key, as JSON and as CSV.

Every number is checked against factory rows whose tokens and costs are chosen by hand.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from accounts.selectors import usage_current_month
from accounts.services import api_key_create
from tests.factories import usage_record_at
from tests.kit import assert_error, bearer

SUMMARY = "/api/usage/summary/"
MARCH = {"start_date": "2026-03-01", "end_date": "2026-04-01"}
METRICS = ("prompt_tokens", "completion_tokens", "total_tokens", "cost", "requests", "refused_requests")
# The token breakdown the providers reported, summed too (checked by its own test).
BREAKDOWN = ("cached_tokens", "cache_creation_tokens", "reasoning_tokens")
# Every sum, in the order the CSV writes them.
ALL_METRICS = ("prompt_tokens", "completion_tokens", "total_tokens", *BREAKDOWN, "cost", "requests", "refused_requests")

pytestmark = pytest.mark.django_db


def at(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso).replace(tzinfo=dt.UTC)


@pytest.fixture
def march(user, other_user) -> dict[str, Any]:
    """``user``'s and ``other_user``'s records around March 2026 (UTC); returns their API keys.

    ``user``: on 03-01 two ``alpha`` replies through ``laptop`` (100+50 and 200+100 tokens, 0.001 and
    0.002 USD); on 03-02 a failed ``beta`` reply without a key (10+0, 0.0001 USD) and two refused
    requests (``alpha`` through ``laptop``, ``beta`` through ``ci``); one record just before
    March and one at April's first instant (outside). ``other_user``: one ``alpha`` reply on 03-01
    (1000+1000, 0.5 USD). Breakdowns: ``user``'s first reply read 80 prompt tokens from the cache
    and reasoned for 30; its second wrote 150 to the cache; ``other_user``'s read 900 and reasoned 500.
    """
    laptop = api_key_create(user=user, name="laptop").api_key
    ci = api_key_create(user=user, name="=cmd|' /C calc'!A0").api_key  # a name a spreadsheet would run
    theirs = api_key_create(user=other_user, name="theirs").api_key
    breakdowns = {
        "2026-03-01T10:00:00": {"cached_tokens": 80, "reasoning_tokens": 30},
        "2026-03-01T11:00:00": {"cache_creation_tokens": 150},
        "2026-03-01T12:00:00": {"cached_tokens": 900, "reasoning_tokens": 500},
    }
    rows = [
        (user, laptop, "alpha", "2026-03-01T10:00:00", 100, 50, "0.001", "completed"),
        (user, laptop, "alpha", "2026-03-01T11:00:00", 200, 100, "0.002", "completed"),
        (user, None, "beta", "2026-03-02T09:00:00", 10, 0, "0.0001", "failed"),
        (user, laptop, "alpha", "2026-03-02T09:30:00", 0, 0, "0", "refused"),
        (user, ci, "beta", "2026-03-02T10:00:00", 0, 0, "0", "refused"),
        (other_user, theirs, "alpha", "2026-03-01T12:00:00", 1000, 1000, "0.5", "completed"),
        (user, laptop, "alpha", "2026-02-28T23:59:59", 7, 7, "1", "completed"),  # February
        (user, laptop, "alpha", "2026-04-01T00:00:00", 9, 9, "2", "completed"),  # April
    ]
    for owner, key, model, when, prompt, completion, cost, status in rows:
        usage_record_at(
            at(when),
            user=owner,
            api_key=key,
            model_name=model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost=Decimal(cost),
            finish_status=status,
            **breakdowns.get(when, {}),
        )
    return {"laptop": laptop, "ci": ci, "theirs": theirs}


def metrics(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[name] for name in METRICS)


def summary(client: Any, **query: Any) -> dict[str, Any]:
    response = client.get(SUMMARY, {**MARCH, **query})
    assert response.status_code == 200, response.content
    return response.json()


def test_a_member_sees_their_own_usage_per_day(auth_client, march):
    page = summary(auth_client)  # group_by defaults to day

    assert (page["start_date"], page["end_date"], page["group_by"]) == ("2026-03-01", "2026-04-01", ["day"])
    assert page["count"] == 2
    first, second = page["results"]
    assert first["day"] == "2026-03-01"
    assert metrics(first) == (300, 150, 450, "0.00300000", 2, 0)  # other_user's 03-01 reply is not counted
    assert second["day"] == "2026-03-02"
    assert metrics(second) == (10, 0, 10, "0.00010000", 1, 2)  # the failed reply is a request; refusals apart
    assert set(first) == {"day", *ALL_METRICS}
    assert [tuple(row[name] for name in BREAKDOWN) for row in (first, second)] == [(80, 150, 30), (0, 0, 0)]


def test_grouped_by_model(auth_client, march):
    rows = summary(auth_client, group_by="model")["results"]

    assert [(row["model_name"], *metrics(row)) for row in rows] == [
        ("alpha", 300, 150, 450, "0.00300000", 2, 1),
        ("beta", 10, 0, 10, "0.00010000", 1, 1),
    ]


def test_grouped_by_api_key(auth_client, march):
    rows = summary(auth_client, group_by="api_key")["results"]

    laptop, ci = march["laptop"], march["ci"]
    assert [(row["api_key_id"], row["api_key_name"], row["api_key_prefix"], *metrics(row)) for row in rows] == [
        (laptop.pk, "laptop", laptop.prefix, 300, 150, 450, "0.00300000", 2, 1),
        (ci.pk, ci.name, ci.prefix, 0, 0, 0, "0.00000000", 0, 1),
        (None, None, None, 10, 0, 10, "0.00010000", 1, 0),  # usage without a key: last
    ]


def test_an_admin_sees_everyone_grouped_by_user(client_for, admin_user, user, other_user, march):
    rows = summary(client_for(admin_user), group_by="user")["results"]

    by_name = {row["username"]: row for row in rows}
    assert set(by_name) == {user.username, other_user.username}
    assert by_name[user.username]["user_id"] == user.pk
    assert metrics(by_name[user.username]) == (310, 150, 460, "0.00310000", 3, 2)
    assert metrics(by_name[other_user.username]) == (1000, 1000, 2000, "0.50000000", 1, 0)
    breakdown = {name: tuple(row[key] for key in BREAKDOWN) for name, row in by_name.items()}
    assert breakdown == {user.username: (80, 150, 30), other_user.username: (900, 0, 500)}


def test_an_admin_filters_by_user_and_groups_by_several_dimensions(client_for, admin_user, other_user, march):
    page = summary(client_for(admin_user), group_by="user,day,model,api_key", user=other_user.pk)

    [row] = page["results"]
    assert page["group_by"] == ["user", "day", "model", "api_key"]
    assert (row["day"], row["model_name"], row["username"], row["api_key_name"]) == (
        "2026-03-01",
        "alpha",
        other_user.username,
        "theirs",
    )
    assert metrics(row) == (1000, 1000, 2000, "0.50000000", 1, 0)


def test_an_admin_sees_every_group_in_the_full_breakdown(client_for, admin_user, user, other_user, march):
    rows = summary(client_for(admin_user), group_by="day,model,user,api_key")["results"]

    # Five groups of the six March records, sorted by day, model, user, then key (no key last).
    laptop, ci, theirs = (march[name].pk for name in ("laptop", "ci", "theirs"))
    day_one = sorted([(user.pk, laptop, 2, 0), (other_user.pk, theirs, 1, 0)])
    expected = [("2026-03-01", "alpha", *group) for group in day_one] + [
        ("2026-03-02", "alpha", user.pk, laptop, 0, 1),
        ("2026-03-02", "beta", user.pk, ci, 0, 1),
        ("2026-03-02", "beta", user.pk, None, 1, 0),
    ]
    assert [
        (row["day"], row["model_name"], row["user_id"], row["api_key_id"], row["requests"], row["refused_requests"])
        for row in rows
    ] == expected


def test_an_empty_group_by_is_one_row_of_totals(auth_client, user, march):
    assert [metrics(row) for row in summary(auth_client, group_by="")["results"]] == [
        (310, 150, 460, "0.00310000", 3, 2)
    ]
    # Nothing used in the range: still one row, of zeros.
    empty = summary(auth_client, group_by="", start_date="2025-01-01", end_date="2025-02-01")
    assert [metrics(row) for row in empty["results"]] == [(0, 0, 0, "0.00000000", 0, 0)]


def test_filters_by_api_key_and_model(auth_client, march):
    [row] = summary(auth_client, group_by="", api_key=march["laptop"].pk, model="alpha")["results"]
    assert metrics(row) == (300, 150, 450, "0.00300000", 2, 1)


def test_a_member_cannot_see_another_users_usage(auth_client, user, other_user, march):
    # Asking for someone else is refused outright (403), not answered with the member's own rows.
    assert_error(
        auth_client.get(SUMMARY, {**MARCH, "user": other_user.pk}), 403, code="permission_denied", param="user"
    )
    # Their own id is allowed; another user's key only narrows the member's own rows to nothing.
    assert metrics(summary(auth_client, group_by="", user=user.pk)["results"][0])[0] == 310
    assert summary(auth_client, group_by="", api_key=march["theirs"].pk)["results"][0]["requests"] == 0


def test_without_dates_it_is_the_current_month(auth_client, user):
    usage_record_at(timezone.now(), user=user, prompt_tokens=3, completion_tokens=4, cost=Decimal("0.25"))
    response = auth_client.get(SUMMARY)
    assert response.status_code == 200
    page = response.json()

    today = timezone.localdate()
    assert page["start_date"] == today.replace(day=1).isoformat()
    [row] = page["results"]
    assert row["day"] == today.isoformat()
    assert metrics(row) == (3, 4, 7, "0.25000000", 1, 0)


@override_settings(TIME_ZONE="America/New_York")
def test_days_are_in_the_servers_time_zone(auth_client, user):
    # 03:00 UTC on March 2nd is 22:00 on March 1st in New York (UTC-5 in winter).
    usage_record_at(at("2026-03-02T03:00:00"), user=user, prompt_tokens=1, completion_tokens=1, cost=Decimal("0.1"))
    usage_record_at(at("2026-03-01T04:00:00"), user=user, prompt_tokens=1, completion_tokens=1, cost=Decimal("0.1"))

    rows = summary(auth_client, start_date="2026-03-01", end_date="2026-03-03")["results"]

    # 04:00 UTC March 1st is still February 28th in New York: outside the range.
    assert [(row["day"], row["requests"]) for row in rows] == [("2026-03-01", 1)]


def test_csv_export_has_a_header_row_and_the_same_numbers(auth_client, march):
    response = auth_client.get(SUMMARY, {**MARCH, "group_by": "day,api_key", "format": "csv"})

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"] == 'attachment; filename="usage-2026-03-01-2026-04-01.csv"'
    rows = list(csv.reader(io.StringIO(response.content.decode("utf-8"))))
    assert rows[0] == ["day", "api_key_id", "api_key_name", "api_key_prefix", *ALL_METRICS]
    laptop, ci = march["laptop"], march["ci"]
    assert rows[1:] == [
        ["2026-03-01", str(laptop.pk), "laptop", laptop.prefix, "300", "150", "450", "80", "150", "30"]
        + ["0.00300000", "2", "0"],
        ["2026-03-02", str(laptop.pk), "laptop", laptop.prefix, "0", "0", "0", "0", "0", "0", "0.00000000", "0", "1"],
        # A key name that starts like a formula is written as text.
        ["2026-03-02", str(ci.pk), "'" + ci.name, ci.prefix, "0", "0", "0", "0", "0", "0", "0.00000000", "0", "1"],
        ["2026-03-02", "", "", "", "10", "0", "10", "0", "0", "0", "0.00010000", "1", "0"],
    ]


def test_csv_by_accept_header_and_with_no_rows(auth_client, user):
    response = auth_client.get(SUMMARY, {**MARCH, "group_by": "model"}, HTTP_ACCEPT="text/csv")

    assert response.status_code == 200
    assert response.content.decode() == "model_name," + ",".join(ALL_METRICS) + "\r\n"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"start_date": "2026-13-01"}, "start_date"),
        ({"start_date": ""}, "start_date"),
        ({"user": ""}, "user"),
        ({"end_date": "03/01/2026"}, "end_date"),
        ({"start_date": "2026-03-02", "end_date": "2026-03-01"}, "end_date"),
        ({"start_date": "2025-01-01", "end_date": "2026-03-01"}, "end_date"),  # over 366 days
        ({"group_by": "day,week"}, "group_by"),
        ({"user": "abc"}, "user"),
        ({"user": "0"}, "user"),
        ({"api_key": "99999999999999999999999"}, "api_key"),
        ({"model": "x" * 201}, "model"),
        ({"format": "xml"}, "format"),
        ({"page": "0"}, "page"),
    ],
)
def test_bad_parameters_are_a_400_naming_the_parameter(auth_client, query, param):
    assert_error(auth_client.get(SUMMARY, {**MARCH, **query}), 400, code="invalid", param=param)
    # Errors are JSON when CSV was asked for too (CSV is unpaginated: it ignores ``page``).
    if param not in ("format", "page"):
        assert_error(auth_client.get(SUMMARY, {**MARCH, **query, "format": "csv"}), 400, param=param)


def test_group_by_given_twice_is_the_union_of_both(auth_client, march):
    # ?group_by=day&group_by=model used to group by model alone: the first was dropped silently.
    response = auth_client.get(f"{SUMMARY}?start_date=2026-03-01&end_date=2026-04-01&group_by=day&group_by=model,day")

    assert response.status_code == 200, response.content
    assert response.json()["group_by"] == ["day", "model"]
    assert {(row["day"], row["model_name"]) for row in response.json()["results"]} >= {("2026-03-01", "alpha")}


@pytest.mark.parametrize("param", ["user", "api_key", "model", "start_date"])
def test_another_parameter_given_twice_is_a_400_naming_it(auth_client, user, param):
    value = {"user": str(user.pk), "api_key": "1", "model": "alpha", "start_date": "2026-03-01"}[param]

    error = assert_error(auth_client.get(f"{SUMMARY}?{param}={value}&{param}={value}"), 400, param=param)

    assert "give it once" in error["message"]


def test_unauthenticated_is_a_401_also_for_csv(api_client):
    assert_error(api_client.get(SUMMARY), 401)
    assert_error(api_client.get(SUMMARY, {"format": "csv"}), 401)


def test_an_api_key_reads_its_users_summary(api_client, api_key_secret, user, march):
    response = api_client.get(SUMMARY, {**MARCH, "group_by": ""}, headers=bearer(api_key_secret))

    assert response.status_code == 200
    assert metrics(response.json()["results"][0]) == (310, 150, 460, "0.00310000", 3, 2)


def test_json_is_paginated_and_csv_is_whole(auth_client, user):
    first = at("2026-01-01T12:00:00")
    for day in range(51):  # one more day than a page holds (PAGE_SIZE 50)
        usage_record_at(first + dt.timedelta(days=day), user=user, prompt_tokens=day, completion_tokens=0)
    query = {"start_date": "2026-01-01", "end_date": "2026-03-01"}

    page_one = summary(auth_client, **query)
    page_two = auth_client.get(page_one["next"]).json()

    assert page_one["count"] == page_two["count"] == 51
    assert [row["day"] for row in page_one["results"]][:2] == ["2026-01-01", "2026-01-02"]
    assert len(page_one["results"]) == 50 and page_one["previous"] is None
    assert [(row["day"], row["prompt_tokens"]) for row in page_two["results"]] == [("2026-02-20", 50)]
    assert page_two["next"] is None and page_two["start_date"] == "2026-01-01"
    assert_error(auth_client.get(SUMMARY, {**query, "page": 3}), 404)
    rows = list(csv.reader(io.StringIO(auth_client.get(SUMMARY, {**query, "format": "csv"}).content.decode())))
    assert len(rows) == 1 + 51


@pytest.mark.parametrize(
    ("time_zone", "now", "month"),
    [
        ("UTC", "2026-12-31T23:59:59", ("2026-12-01", "2027-01-01")),  # December: next month is next year's
        ("Asia/Tokyo", "2026-12-31T15:00:00", ("2027-01-01", "2027-02-01")),  # already January 1st in Tokyo
        ("America/New_York", "2026-03-01T04:59:59", ("2026-02-01", "2026-03-01")),  # still February there
    ],
)
def test_the_current_month_is_the_time_zones(time_zone, now, month):
    with override_settings(TIME_ZONE=time_zone):
        start, end = usage_current_month(now=at(now))

    assert (start.isoformat(), end.isoformat()) == month
