"""Errors of vtx's own. Each message says what went wrong and what to do about it."""


class VtxError(Exception):
    """Base class of every error vtx raises on purpose."""

    exit_code = 1


class UsageError(VtxError):
    """Bad options or a setup problem the user can fix (exit code 2)."""

    exit_code = 2


class VideoError(VtxError):
    """One video cannot be processed. Other videos are unaffected."""


class VideoOpenError(VideoError):
    """The file cannot be opened as a video (missing, unreadable, not a video, no video stream)."""


class DecodeError(VideoError):
    """Decoding failed beyond the tolerated number of consecutive corrupt packets."""


class WeightsUnavailable(UsageError):
    """Official weights are neither cached nor downloadable."""


class CacheInUse(VtxError):
    """Another process holds the output cache (exit code 4)."""

    exit_code = 4


class CacheMismatch(UsageError):
    """An existing cache was made with settings that differ from the requested ones."""


class DiskFull(VtxError):
    """A write ran out of space (exit code 5). The message names the path, the space the step
    needed and what was kept; nothing finished is lost."""

    exit_code = 5


class CacheDamaged(VtxError):
    """The feature cache is damaged: a checksum mismatch or a broken HDF5 structure (exit code
    6). The message names the file, and the video and dataset when known; ``vtx check FILE
    --repair`` removes the damaged videos so that the next ``vtx extract`` recomputes them."""

    exit_code = 6


class ReadOnly(UsageError):
    """A command must write where it cannot (read-only file system or no permission)."""
