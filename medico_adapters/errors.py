"""Typed errors for the failures a user can cause.

Every message is one sentence that names the file (or argument) and the reason; the CLI prints
it as a single line and exits non-zero. Anything else escaping is a bug and keeps its traceback.
"""


class MedicoError(Exception):
    """A failure caused by input, environment or state, not by a bug in the kit."""


class CheckpointError(MedicoError):
    """A checkpoint cannot be read, is not SAM, or is the wrong architecture."""


class UnsafeCheckpointError(CheckpointError):
    """Unpickling the checkpoint would need objects that can run code."""


class RegistryError(MedicoError):
    """An unknown model name, a failed download or a hash mismatch."""


class DeviceError(MedicoError):
    """A requested compute device is not available."""


class PatchError(MedicoError):
    """A tool tree cannot be patched, unpatched or inspected."""


class LayoutError(PatchError):
    """The tool's source matches none of the layouts the adapter knows."""


class ImageError(MedicoError):
    """An image or volume cannot be read, or a prompt does not fit it."""


class FileBusyError(MedicoError):
    """A file could not be replaced or removed because another process holds it (Windows)."""


class AmbiguousInstallError(PatchError):
    """Several installed copies of a tool were found; ``--path`` has to name one."""


class MissingDependencyError(MedicoError):
    """An optional extra the command needs is not installed."""


class ExportCheckError(CheckpointError):
    """An exported model does not reproduce the torch model within tolerance."""


class BackendError(MedicoError):
    """A requested inference backend cannot run here (not installed, or not on this device)."""


class TrainingInterrupted(MedicoError):
    """Ctrl-C stopped a training run; its checkpoint is saved and ``--resume`` continues it."""
