"""Account lifecycle: password change and reset, email verification, deactivation.

``services`` holds the writes, ``apis`` and ``serializers`` the REST interface
(``/api/auth/password/...``, ``/api/auth/email/...``, ``/api/users/{id}/deactivate/``), ``tasks``
the emails (sent by Celery, so an answer never waits on, nor reveals by its timing, a mail server).
A package of its own, like ``accounts.metering``, because ``accounts.services`` and
``accounts.apis`` are the registration, key and budget modules.
"""
