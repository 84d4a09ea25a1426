"""Reading DICOM files ahead of the thread that parses them.

Parsing a DICOM file with pydicom is Python work that holds the GIL: several threads parsing at
once do not run side by side, they take turns, and the turns cost more than they save (on 2 cores a
study's 350 headers took 1.05 s with 8 parsing threads, 0.59 s with one). Threads that only read the
files ahead cost turns too (about 0.2 s for a whole-head study whose files are in the page cache).
So the files are parsed one after the other in the caller's thread, and :func:`read_ahead` asks the
operating system to read the next ones meanwhile (``posix_fadvise(WILLNEED)``: the kernel reads
them in the background, no thread of ours waits), so that a disk or a network share still works
ahead of the parse. What is read ahead is never used directly: the parse reads the file itself, so a
file that changed or cannot be read is found, and reported, by the parse as before.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

__all__ = ["HEADER_BYTES", "read_ahead"]

#: How much of a file is read ahead when only its header is parsed (bytes): a classic image's
#: header is a few KiB; an enhanced multi-frame header read beyond it comes from the disk as usual.
HEADER_BYTES = 64 * 1024
_ADVISE = getattr(os, "posix_fadvise", None)


def _announce(path: str | os.PathLike, nbytes: int | None) -> None:
    """Ask the operating system to read the first ``nbytes`` of ``path`` (the whole file when
    ``None``) into its cache in the background. Errors are left to the parse that follows."""
    if _ADVISE is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _ADVISE(fd, 0, nbytes or 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_ahead(paths: Sequence[str | os.PathLike | None], workers: int, *, nbytes: int | None = HEADER_BYTES,
               window: int | None = None) -> Iterator[int]:
    """The indices ``0 .. len(paths) - 1`` in order, for the caller to parse ``paths[i]``, each file
    up to ``window`` files ahead of it (default ``4 * workers``) announced to the operating system
    for reading in the background (:func:`_announce`).

    Args:
        paths: the files, in the order they will be parsed (``None``: nothing to read for that index).
        workers: the reading the caller would have given threads (``io_threads``); ``<= 1``: no read-ahead.
        nbytes: how much of each file to read ahead (bytes); ``None``: the whole file.
        window: how many files at most are read ahead of the one being parsed.
    """
    n = len(paths)
    window = 0 if workers <= 1 else max(1, int(window if window is not None else 4 * workers))
    announced = 1  # the first file is read by the parse itself
    for i in range(n):
        while window and announced < min(n, i + 1 + window):
            if paths[announced] is not None:
                _announce(paths[announced], nbytes)
            announced += 1
        yield i
