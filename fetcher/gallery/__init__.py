"""The read-only gallery behind ``fetcher serve``: see and search what an archive holds.

``server`` owns the application's lifetime, ``guard`` the token, Host, path and
header rules, ``routes`` the answers, ``params`` the filters read from a request,
``pages`` the HTML, ``reader`` the catalog on its own thread, ``thumbs`` the
thumbnails (Pillow). The browser side is ``static/gallery.js`` and ``gallery.css``.
Nothing here writes but the thumbnails, inside the archive's ``.fetcher/thumbs/``.
"""

from __future__ import annotations

from .server import DEFAULT_HOST, DEFAULT_PORT, GalleryOptions, gallery_url, serve

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "GalleryOptions", "gallery_url", "serve"]
