"""User-facing errors: one sentence that names the problem and one that names the fix.

Every layer (CLI, Slicer panel, effect) shows ``str(error)`` and nothing else, so the
message must stand on its own without a traceback.
"""


class MedVLSMError(Exception):
    """A problem the user can fix. ``problem`` says what is wrong, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(f"{self.problem}. {self.fix}." if self.fix else f"{self.problem}.")


class InputError(MedVLSMError):
    """The image, prompt or option given by the user cannot be used."""


class ModelError(MedVLSMError):
    """The model cannot be found, downloaded or loaded."""


class Cancelled(MedVLSMError):
    """The user cancelled a run; nothing was written."""

    def __init__(self, message: str = "The run was cancelled", fix: str = "Nothing was changed"):
        super().__init__(message, fix)
