"""Organization administration over REST: members' roles, teams, invitations by a signed link.

``services`` holds the writes, ``selectors`` the reads, ``apis`` and ``serializers`` the REST
interface (``/api/organizations/``, ``/api/organization/members/``, ``/api/teams/``,
``/api/invitations/``), ``tasks`` the invitation email. A package of its own, like
``accounts.lifecycle``, because ``accounts.apis`` and ``accounts.services`` are already long.
"""
