"""Model access: which models and aliases a request may use, from its organization, its teams and its key.

The rule (README, "Organizations"): a model or alias name is allowed when every list that applies
allows it, i.e. the intersection of

- the ``allowed_models`` of the organization the request acts in;
- the union of the ``allowed_models`` of the caller's teams there that have one
  (``accounts.selectors.team_list_restricting_models``: the one place that says which teams apply);
- the ``allowed_models`` of the API key the request used, if any.

An empty list imposes nothing. A list allows a name when it holds that name or the name of the
model it resolves to: a model's name allows its aliases, an alias's name only that alias. The
platform superuser is no exception: acting in an organization, that organization's list applies
(and its teams' lists, should it be a member of some). A name that is not allowed answers 404
``model_not_found``, as one that does not exist (``llm.selectors``).

Per request, no query: the organization's and the teams' lists are cached per (organization,
user, API key) in a ``LookupCache``, cleared in every process when an organization, a team, a team
membership, a membership or a key changes; the key's own list is read from the principal's key
(cached with it, and fixed once the key is created). Reading the organization's list from the
cache rather than from the principal keeps a long-lived WebSocket (whose principal is the one it
connected with) in step with a change.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

from chatbackend.asyncdb import run_sync
from chatbackend.lookup_cache import LookupCache

from .authentication import Principal
from .models import Organization
from .selectors import team_list_restricting_models


@dataclass(frozen=True, slots=True)
class ModelAccess:
    """The model allowlists that apply to a request: a name must be allowed by every one of them.

    ``lists``: the non-empty allowlists (model and alias names), in no meaningful order; none: every
    enabled model. Immutable: shared between the requests of one caller.
    """

    lists: tuple[frozenset[str], ...] = ()

    @property
    def restricted(self) -> bool:
        """Return True when some list applies (not every enabled model is allowed)."""
        return bool(self.lists)

    def allows(self, *names: str) -> bool:
        """Return True when every list holds any of ``names`` (the name sent, the name of its model)."""
        return all(any(name in allowed for name in names) for allowed in self.lists)

    def narrowed(self, names: list[str] | tuple[str, ...] | frozenset[str]) -> ModelAccess:
        """Return this access with the allowlist ``names`` added (empty: unchanged)."""
        return ModelAccess((*self.lists, frozenset(names))) if names else self


# Every model allowed: a caller no list restricts (and code that checks no caller, e.g. bench seeds).
UNRESTRICTED = ModelAccess()

# The organization's and teams' part of a caller's access, by (organization id, user id, API key
# id or None). Cleared in every process on a change (``AccountsConfig.ready``).
model_access_cache: LookupCache[tuple[int, int, int | None], ModelAccess] = LookupCache(
    "accounts.model_access", maxsize=10_000
)


def _cache_key(principal: Principal) -> tuple[int, int, int | None]:
    api_key = principal.api_key
    return (principal.organization.pk, principal.user.pk, api_key.pk if api_key is not None else None)


def _organization_and_teams_read(principal: Principal) -> ModelAccess:
    """Read the organization's list and the union of its restricting teams' lists. Two queries."""
    # The row, not ``principal.organization``: a socket's principal may predate a change.
    organization_models = (
        Organization.objects.filter(pk=principal.organization.pk).values_list("allowed_models", flat=True).first()
    )
    teams = team_list_restricting_models(
        user=principal.user, api_key=principal.api_key, organization=principal.organization
    )
    team_models = frozenset(chain.from_iterable(teams.values_list("allowed_models", flat=True)))
    return UNRESTRICTED.narrowed(organization_models or ()).narrowed(team_models)


def _with_key(access: ModelAccess, principal: Principal) -> ModelAccess:
    return access.narrowed(principal.api_key.allowed_models) if principal.api_key is not None else access


def model_access_for(*, principal: Principal) -> ModelAccess:
    """Return the model access of a request by ``principal`` (see the module). Sync.

    From this process's cache, else two queries (then cached, ``chatbackend.lookup_cache``).
    """
    key = _cache_key(principal)
    access = model_access_cache.get(key)
    if access is None:
        ticket = model_access_cache.fill_ticket()  # before the read: see lookup_cache
        access = _organization_and_teams_read(principal)
        model_access_cache.put(key, access, ticket)
    return _with_key(access, principal)


async def model_access_for_async(*, principal: Principal) -> ModelAccess:
    """``model_access_for`` on the event loop: a hit answers at once, a miss reads in one worker hop."""
    key = _cache_key(principal)
    access = model_access_cache.get(key)
    if access is None:
        ticket = await model_access_cache.fill_ticket_async()
        access = await run_sync(_organization_and_teams_read, principal)
        model_access_cache.put(key, access, ticket)
    return _with_key(access, principal)


__all__ = ["UNRESTRICTED", "ModelAccess", "model_access_cache", "model_access_for", "model_access_for_async"]
