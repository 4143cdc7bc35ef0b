"""The HTML page of a share link, mounted at the site root (``/share/<token>``; not under ``/api``)."""

from django.urls import path

from . import views

urlpatterns = [path("share/<str:token>", views.share_page, name="share-page")]
