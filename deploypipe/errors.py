"""The two kinds of failure the command line tells apart.

``InputError``: the user gave something we cannot use (missing file, bad YAML, unknown key,
checkpoint that does not fit, unreachable server). The CLI prints one line — the problem and the
fix — and exits 2, before anything is written.

``StageFailed``: a stage raised while running. Its MLflow run is marked FAILED, earlier stages'
artifacts stay, and the CLI exits 1.
"""


class InputError(Exception):
    def __init__(self, problem: str, fix: str):
        super().__init__(problem, fix)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem} — fix: {self.fix}"


class StageFailed(Exception):
    def __init__(self, stage_id: str, error: BaseException):
        super().__init__(stage_id, error)
        self.stage_id = stage_id
        self.error = error

    def __str__(self) -> str:
        return f"stage '{self.stage_id}' failed: {type(self.error).__name__}: {self.error}"
