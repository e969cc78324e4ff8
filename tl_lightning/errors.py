"""User-facing errors: one clear sentence that names the problem and the fix."""


class TLError(Exception):
    """An error caused by the user's input (config, data, paths), printed without a traceback."""

    #: the most recent TLError, so the CLI can find it when a library wrapped it in its own exception
    last: "TLError | None" = None

    def __init__(self, *args):
        super().__init__(*args)
        TLError.last = self


class DatasetNotFoundError(TLError):
    """A data set is missing or incomplete on disk."""


def missing_dataset(name: str, root, expected: str, source: str) -> DatasetNotFoundError:
    """Build the standard missing-data message from a dataset's on-disk contract."""
    return DatasetNotFoundError(
        f"{name} not found under '{root}': expected {expected}; get it from {source} "
        f"and point --data.data_dir at the folder that holds it."
    )
