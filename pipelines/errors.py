"""Errors of the Ray pipeline that are the user's to fix (the CLI prints them without a traceback)."""


class PipelineError(RuntimeError):
    """A problem found before the run started (resources, MLflow, Ray, unsupported option)."""
