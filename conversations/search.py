"""Search over conversation titles and message content (a selector: reads only).

On PostgreSQL: full-text search (``django.contrib.postgres.search``; the query is read as a web
search engine reads it: ``websearch_to_tsquery``, so ``"exact phrase"``, ``or`` and ``-word`` work),
English stemming (``SEARCH_CONFIG``), ranked by ``ts_rank`` with a title hit weighing ten times a
message hit (weights A and D), served by the GIN index ``message_content_fts_idx`` (migration
``0010_search_organize``). Elsewhere (SQLite), and on PostgreSQL for a query with a word of a script
written without spaces between words (Chinese, Japanese, Thai, ...; and Korean, whose words carry
their particles: ``UNSEGMENTED_SCRIPTS``): the query is read as ``websearch_to_tsquery`` reads it
(``query_alternatives``), each word or ``"quoted phrase"`` matched as a substring, case-insensitively
(SQL ``LIKE``; ASCII only on SQLite): every word of one alternative (``or`` separates them), and no
``-word`` of it, in the title or together in one message; ranked 1.0 for a hit in both, 0.75 in the
title, 0.5 in a message only.
PostgreSQL's text search parser has no word breaker for those scripts: it reads a whole run of them
as one word, so ``天气`` in ``今天的天气很好`` would never be found (the fallback pays a scan of the
caller's own messages instead of the index).

Either way a result carries ``search_rank`` (higher is better), ``search_message_id`` (the best
matching message, None for a title-only hit) and, for a page of results, a plain-text snippet of
that message around the first query word found in it (``search_snippets``).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import regex
from django.contrib.postgres.search import SearchQuery, SearchRank, SearchVector
from django.db import connection
from django.db.models import Case, F, FloatField, OuterRef, Q, QuerySet, Subquery, Value, When
from django.db.models.functions import Coalesce, Greatest

from accounts.authentication import Principal

from .models import Conversation, Message
from .selectors import conversation_list

# The text search configuration of the vector, the query and the GIN index (same expression).
SEARCH_CONFIG = "english"
MAX_QUERY_CHARS = 500
SNIPPET_CHARS = 200

# A query's parts as websearch_to_tsquery reads them: an optional "-" (not), then a "quoted phrase"
# or a word.
_TERM = re.compile(r'(-?)"([^"]*)"?|(\S+)')
# Scripts whose words PostgreSQL's default parser cannot tell apart (no spaces between them, or, for
# Hangul, a particle attached): a query with any of them is matched by substring (``_search_fallback``).
UNSEGMENTED_SCRIPTS = ("Han", "Hiragana", "Katakana", "Hangul", "Thai", "Lao", "Khmer", "Myanmar", "Tibetan")
_UNSEGMENTED = regex.compile("[" + "".join(rf"\p{{{script}}}" for script in UNSEGMENTED_SCRIPTS) + "]")


def conversation_search_scope(*, actor: Principal) -> QuerySet[Conversation]:
    """Return the conversations a search by ``actor`` looks in: their own, out of the trash, in the
    organization the request acts in (the platform superuser: in every organization).

    Narrower than ``conversation_list``: an organization's admins read their members'
    conversations one by one, but search never surfaces another user's conversation.
    """
    return conversation_list(actor=actor).filter(owner=actor.user)


class Alternative(NamedTuple):
    """One alternative of a search query: the words (or phrases) that must all appear, and those that
    must not."""

    words: list[str]
    excluded: list[str]


def query_alternatives(query: str) -> list[Alternative]:
    """Return ``query`` read as PostgreSQL's ``websearch_to_tsquery`` reads it
    (https://www.postgresql.org/docs/current/textsearch-controls.html#TEXTSEARCH-PARSING-QUERIES):
    words and ``"quoted phrases"`` that must all appear, ``-word`` (or ``-"phrase"``) that must not,
    ``or`` between two alternatives. An alternative without a word to look for (only ``-word``) is
    dropped, so an empty list means the query matches nothing."""
    alternatives = [Alternative([], [])]
    for negated, phrase, word in _TERM.findall(query):
        if word.lower() == "or":
            alternatives.append(Alternative([], []))
            continue
        if word.startswith("-"):
            negated, word = "-", word.lstrip("-")
        term = (phrase or word.strip('"')).strip()
        if term:
            (alternatives[-1].excluded if negated else alternatives[-1].words).append(term)
    return [alternative for alternative in alternatives if alternative.words]


def query_terms(query: str) -> list[str]:
    """Return the words and ``"quoted phrases"`` that ``query`` looks for (``query_alternatives``):
    those of every alternative, without ``-word`` ones or ``or``."""
    return [term for alternative in query_alternatives(query) for term in alternative.words]


def conversation_search(*, conversations: QuerySet[Conversation], query: str) -> QuerySet[Conversation]:
    """Return the conversations of ``conversations`` matching ``query``, best first (then most
    recently updated), annotated with ``search_rank`` (float) and ``search_message_id`` (int or None).

    ``conversations`` must come from ``conversation_search_scope`` (then filtered at will): the
    scope is the caller's. A query with no searchable word matches nothing. On PostgreSQL, full-text
    search unless the query holds a word of ``UNSEGMENTED_SCRIPTS`` (then substrings, as on SQLite).
    """
    if connection.vendor == "postgresql" and _UNSEGMENTED.search(query) is None:
        return _search_postgresql(conversations, query)
    return _search_fallback(conversations, query)


def _search_postgresql(conversations: QuerySet[Conversation], query: str) -> QuerySet[Conversation]:
    search_query = SearchQuery(query, search_type="websearch", config=SEARCH_CONFIG)
    content = SearchVector("content", config=SEARCH_CONFIG)  # the GIN index's expression
    title = SearchVector("title", config=SEARCH_CONFIG, weight="A")
    matches = (
        Message.objects.filter(conversation=OuterRef("pk"))
        .annotate(document=content)
        .filter(document=search_query)
        .annotate(rank=SearchRank(content, search_query))
        .order_by("-rank", "-id")
    )
    return (
        conversations.annotate(
            title_document=title,
            search_message_id=Subquery(matches.values("id")[:1]),
            message_rank=Subquery(matches.values("rank")[:1], output_field=FloatField()),
            title_rank=Case(
                When(title_document=search_query, then=SearchRank(title, search_query)),
                default=Value(0.0),
                output_field=FloatField(),
            ),
        )
        .filter(Q(title_document=search_query) | Q(search_message_id__isnull=False))
        .annotate(search_rank=Greatest(F("title_rank"), Coalesce(F("message_rank"), Value(0.0))))
        .order_by("-search_rank", "-updated_at", "-id")
    )


def _search_fallback(conversations: QuerySet[Conversation], query: str) -> QuerySet[Conversation]:
    alternatives = query_alternatives(query)
    if not alternatives:
        return conversations.none()
    in_title = _matching("title", alternatives)
    in_message = _matching("content", alternatives)
    matches = Message.objects.filter(in_message, conversation=OuterRef("pk")).order_by("-id")
    return (
        conversations.annotate(search_message_id=Subquery(matches.values("id")[:1]))
        .filter(in_title | Q(search_message_id__isnull=False))
        .annotate(
            search_rank=Case(
                When(in_title & Q(search_message_id__isnull=False), then=Value(1.0)),
                When(in_title, then=Value(0.75)),
                default=Value(0.5),
                output_field=FloatField(),
            )
        )
        .order_by("-search_rank", "-updated_at", "-id")
    )


def _matching(field: str, alternatives: list[Alternative]) -> Q:
    """Return the condition that ``field`` holds one of ``alternatives``: each of its words and none
    of its excluded ones, as substrings, case-insensitively."""
    matching = Q()
    for words, excluded in alternatives:
        condition = Q()
        for word in words:
            condition &= Q(**{f"{field}__icontains": word})
        for word in excluded:
            condition &= ~Q(**{f"{field}__icontains": word})
        matching |= condition
    return matching


def search_snippets(*, message_ids: list[int], query: str) -> dict[int, str]:
    """Return, per message id, up to ``SNIPPET_CHARS`` characters of its content around the first
    query term found in it (case-insensitively; its start when none is, as a stemmed match may
    be), whitespace collapsed. Plain text, no markup: the content is the user's. One query."""
    terms = [term.lower() for term in query_terms(query)]
    snippets = {}
    for pk, content in Message.objects.filter(pk__in=message_ids).values_list("pk", "content"):
        lowered = content.lower()
        found = [index for index in (lowered.find(term) for term in terms) if index >= 0]
        start = max(0, min(found) - SNIPPET_CHARS // 4) if found else 0
        snippet = " ".join(content[start : start + SNIPPET_CHARS].split())
        snippets[pk] = ("…" if start else "") + snippet + ("…" if start + SNIPPET_CHARS < len(content) else "")
    return snippets
