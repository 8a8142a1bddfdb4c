"""The read-only gallery behind ``fetcher serve``: see and search what an archive holds.

``server`` owns the application's lifetime, ``guard`` the token, Host, path and
header rules, ``routes`` the answers, ``params`` the filters read from a request,
``pages`` the HTML, ``reader`` the catalog on its own thread, ``thumbs`` the
thumbnails (Pillow), ``sources`` the files (from a folder, or streamed from a bucket).
The browser side is ``static/gallery.js`` and ``gallery.css``. Nothing here writes but
the thumbnails: a folder's inside its ``.fetcher/thumbs/``, a bucket's in the user
cache dir.
"""

from __future__ import annotations

from .server import DEFAULT_HOST, DEFAULT_PORT, GalleryOptions, gallery_url, serve

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "GalleryOptions", "gallery_url", "serve"]
