"""The pipeline's errors: one per stage, each carrying the one-line message the CLI prints (naming
the file or option at fault and what to do), never a traceback."""


class ExtractError(Exception):
    """Bad arguments or input folder; the message is a one-line explanation."""


class ExtractInterrupted(ExtractError):
    """A SIGINT or SIGTERM stopped the job after it committed the videos it had finished."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class DistillError(Exception):
    """Bad arguments, an unusable cache or an incompatible checkpoint; one-line message."""


class EvalError(Exception):
    """Missing checkpoint, unknown option, or no usable videos; one-line message."""


class TaskError(Exception):
    """A task that cannot be loaded (missing root or split files); one-line message."""


class ConceptError(Exception):
    """A bad class list, description file or concept bank; one-line message."""


class ExportError(Exception):
    """No checkpoint, an option that does not fit the run, or an export that does not match; one line."""


class PreviewError(Exception):
    """A video that is not in the cache or has no frames; one-line message."""
