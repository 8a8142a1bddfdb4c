"""Thumbnails for the grid, made by Pillow on first view and kept in ``.fetcher/thumbs/``.

This is the only thing the gallery writes, and only inside fetcher's own hidden
folder (a bucket's thumbnails go to the user cache dir: nothing is written into a
bucket): a thumbnail is a temp file renamed into place, so a reader never sees half
of one, and two requests for the same picture race harmlessly. An archive that
cannot be written (a backup, a read-only mount) still gets its thumbnails, made
again for each view. Pillow is imported here alone, when the first one is made.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path

#: Longest side of a thumbnail, in pixels: two columns of a phone, a column of a desktop.
SIZE = 320
QUALITY = 80
CONTENT_TYPE = "image/webp"


class NotAPicture(Exception):
    """Pillow cannot make a thumbnail of this file (not an image, damaged, too large)."""


class Thumbnails:
    """A thumbnail store: WebPs in ``folder``, named by a digest of what each was made of."""

    def __init__(self, folder: Path) -> None:
        #: A resolved path: ``<archive>/.fetcher/thumbs``, or a bucket's in the user cache dir.
        #: Its parent must exist; the store makes only the folder itself and those below.
        self.folder = folder

    def get(self, source: Path, relative: str) -> bytes:
        """The thumbnail of ``source`` (a contained file), from the store or made now.

        The store's key covers the file's path, size and modification time, so a
        file replaced in place (``verify --repair``) gets a new thumbnail.
        """
        info = source.stat()
        identity = f"{relative}\0{info.st_size}\0{info.st_mtime_ns}"
        found = self.kept(identity)
        return found if found is not None else self.keep(identity, make_thumbnail(source))

    def kept(self, identity: str) -> bytes | None:
        """The thumbnail stored for ``identity`` (what it was made of), if there is one."""
        kept = self._path(identity)
        if self._ours(kept.parent):
            try:
                return kept.read_bytes()
            except OSError:
                pass
        return None

    def keep(self, identity: str, data: bytes) -> bytes:
        """Store ``data`` as ``identity``'s thumbnail when the store can be written; ``data``."""
        self._keep(self._path(identity), data)
        return data

    def _path(self, identity: str) -> Path:
        key = hashlib.sha256(f"{identity}\0{SIZE}".encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.webp"

    def _ours(self, folder: Path) -> bool:
        """Whether ``folder`` is the real folder it should be: no link leads out of the store."""
        return os.path.realpath(folder) == str(folder) and folder.is_dir()

    def _keep(self, kept: Path, data: bytes) -> None:
        """Write ``data`` at ``kept`` (temp file, then rename); a store that refuses is skipped."""
        try:
            for folder in (self.folder, kept.parent):  # one at a time: never through a link
                with contextlib.suppress(FileExistsError):
                    folder.mkdir()
                if not self._ours(folder):
                    return
            handle, temp = tempfile.mkstemp(dir=kept.parent, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(data)
                Path(temp).replace(kept)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        except OSError:
            return  # read-only or full: the thumbnail is served all the same


def make_thumbnail(source: Path) -> bytes:
    """A WebP of at most :data:`SIZE` pixels a side, turned upright by its EXIF orientation."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.draft("RGB", (SIZE, SIZE))  # JPEG: decode at a fraction of the size
            upright = ImageOps.exif_transpose(image)
            upright.thumbnail((SIZE, SIZE))
            if upright.mode not in ("RGB", "RGBA"):
                upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
            out = io.BytesIO()
            upright.save(out, "WEBP", quality=QUALITY)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise NotAPicture(f"{source.name}: {exc}") from exc
    return out.getvalue()
