"""The admin page at `/admin`: what the server is doing, live, and actions on it.

Off unless `admin_password` or `admin_secret` is set (see docs/admin.md).
"""

from __future__ import annotations

from plexus.admin.session import make_admin_token
from plexus.admin.web import AdminSite

__all__ = ["AdminSite", "make_admin_token"]
