"""The checks every parquet reader of the project makes on a file before reading its rows.

pyarrow and ``datasets`` fail on a 0-row file or a file with two columns of one name with an error that does not
name the cause (``datasets``: ``DatasetGenerationError``, the real cause only in a log line above it; pyarrow:
``Multiple matches for FieldRef.Name(...)`` in the middle of a schema dump). :func:`check_parquet` reads only the
footer and says ``FILE: no rows`` / ``FILE: duplicate column 'caption'`` instead.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from diffalign.errors import DiffalignError


def check_parquet(path: str | Path, error: type[DiffalignError], *, allow_empty: bool = False) -> list[str]:
    """The column names of the parquet file ``path``, read from its footer.

    Raises ``error`` (the caller's data error type) as ``FILE: reason; what to do`` when the file is not readable
    parquet, has a column name twice, or holds no rows (unless ``allow_empty``).
    """
    try:
        metadata = pq.read_metadata(path)
        names = list(metadata.schema.to_arrow_schema().names)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise error(f"{path}: not a readable parquet file ({err}); write it again or remove it") from err
    duplicates = [name for name, n in Counter(names).items() if n > 1]
    if duplicates:
        listed = ", ".join(repr(name) for name in duplicates)
        raise error(
            f"{path}: duplicate column{'s' if len(duplicates) > 1 else ''} {listed}; column names must be unique: "
            "rename or drop the extra one (e.g. pyarrow Table.rename_columns) and write the file again"
        )
    if metadata.num_rows == 0 and not allow_empty:
        raise error(f"{path}: no rows; remove this file, or point at parquet data that holds rows")
    return names
