"""NextChat sync routes, mounted at the site root (not under ``/v1``).

``^(?:/)?``: NextChat's Upstash client sends ``<base>//api/upstash/...`` (a double slash); Django's
root pattern takes the first slash, these take the second.
"""

from django.urls import re_path

from . import apis

urlpatterns = [
    re_path(r"^dav/(?P<path>.*)$", apis.webdav, name="sync-webdav"),
    re_path(r"^(?:/)?api/webdav/(?P<path>.*)$", apis.webdav_proxy, name="sync-webdav-proxy"),
    re_path(r"^(?:/)?api/upstash/(?P<action>[^/]+)/(?P<key>.+?)/?$", apis.upstash, name="sync-upstash"),
]
