"""The two kinds of failure the command line tells apart.

``InputError``: the user gave something we cannot use (missing file, bad YAML, unknown key,
checkpoint that does not fit, unreachable server). The CLI prints one line — the problem and the
fix — and exits 2, before anything is written.

Methods (the algorithm modules, usable without the pipeline) never raise ``InputError``: they raise
ValueError / TypeError, and a message meant for the user ends with " — fix: <what to do>"
(``FIX``). The engine turns exactly those into ``InputError`` (``InputError.from_error``); any other
exception of a stage is a failure.

``StageFailed``: a stage raised while running. Its MLflow run is marked FAILED, earlier stages'
artifacts stay, and the CLI exits 1.

``TrackingUnavailable``: the tracking server stopped answering mid-run. Outputs on disk are kept
(finished stages, training checkpoints), no further MLflow call is attempted, the CLI prints one
line and exits 1; a rerun uploads what is missing and marks the abandoned runs KILLED.
"""


FIX = " — fix: "


class InputError(Exception):
    def __init__(self, problem: str, fix: str):
        super().__init__(problem, fix)
        self.problem = problem
        self.fix = fix

    @classmethod
    def from_error(cls, err: BaseException, where: str = "") -> "InputError":
        """A method's ValueError / TypeError whose message carries " — fix: ..." as a one-line input error."""
        problem, _, fix = str(err).partition(FIX)
        return cls(f"{where}: {problem}" if where else problem, fix)

    @staticmethod
    def is_for_user(err: BaseException) -> bool:
        """Whether ``err`` is a method's message to the user (ValueError / TypeError with a fix)."""
        return isinstance(err, (ValueError, TypeError)) and FIX in str(err)

    def __str__(self) -> str:
        return f"{self.problem} — fix: {self.fix}"


class StageFailed(Exception):
    def __init__(self, stage_id: str, error: BaseException):
        super().__init__(stage_id, error)
        self.stage_id = stage_id
        self.error = error

    def __str__(self) -> str:
        return f"stage '{self.stage_id}' failed: {type(self.error).__name__}: {self.error}"


class TrackingUnavailable(RuntimeError):
    """The tracking server stopped answering during a run (see the module docstring)."""


def check_writable(folder, what: str, fix: str) -> None:
    """Raise InputError when no file can be created in ``folder`` (permissions, a read-only file
    system: ``os.access`` misses the latter for root, so a file is really created and removed)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".deploypipe-write-check-"):
            pass
    except OSError as err:
        raise InputError(f"{what} {folder} is not writable ({err.strerror or err})", fix) from None
