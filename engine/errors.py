"""A handful of domain exceptions. Each message says what was expected, what was found, and how to fix it."""


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""


class ConfigError(EngineError, ValueError):
    """A configuration value is unknown or invalid."""


class CatalogError(EngineError):
    """An input catalogue is unreadable or lacks what the job needs (names the file and column)."""


class ModalityError(EngineError, ValueError):
    """Modality data has the wrong shape, type or values."""


class CodecError(EngineError):
    """A tokenizer is unfitted, or its saved state is missing or of an unknown version."""


class ModelError(EngineError):
    """A model directory is incomplete or incompatible with this engine."""


class OutputMismatchError(EngineError):
    """Rows written do not match rows read (lost, duplicated or unknown object_ids)."""


class StaleIndexError(EngineError):
    """A FAISS index was built from another version of its table."""


class SearchError(EngineError):
    """A search cannot run: the table has no readable index, the object_id is not in the table,
    or a query vector does not fit the index."""


class UnitsFailedError(CatalogError):
    """More input units failed than --max-failed-fraction allows; carries the job summary when there is one."""

    def __init__(self, message: str, summary: dict | None = None) -> None:
        super().__init__(message)
        self.summary = summary
