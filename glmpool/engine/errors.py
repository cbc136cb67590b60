"""Engine errors: one type per way a request or a model can fail, each with a one-line message."""


class EngineError(Exception):
    """Base of every error the engine raises on purpose; str(error) is a one-line human sentence."""


class CheckpointError(EngineError):
    """The model directory is missing, incomplete or inconsistent (missing or mis-shaped tensors)."""


class ModelNotFoundError(CheckpointError):
    """A hub id could not be resolved: offline and not cached, or unknown."""


class PromptTooLongError(EngineError, ValueError):
    """The prompt does not fit the model window, or `max_length` leaves no room for an answer."""


class AdmissionError(EngineError):
    """The batch is full (sequences or KV-cache tokens): retry later, nothing was changed."""
