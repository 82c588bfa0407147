"""--columns: a format's fields read from other columns (instruction=question,output=answer), before a row's
format is told; a mapped column that a row lacks is that row's error, naming the column."""
from __future__ import annotations


def parse_columns(text: str | dict | None) -> dict[str, str]:
    """Returns {field: column} from 'instruction=question,output=answer' (or a mapping); ValueError if malformed."""
    if not text:
        return {}
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    out = {}
    for part in str(text).split(","):
        target, sep, source = part.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise ValueError(f"expected FIELD=COLUMN pairs like instruction=question,output=answer, got {part!r}")
        out[target.strip()] = source.strip()
    return out


def rename_columns(row, columns: dict[str, str]):
    """Returns `row` with each mapped column copied to its format field ({"instruction": "question"})."""
    if not isinstance(row, dict):
        return row
    out = dict(row)
    for target, source in columns.items():
        if source not in row:
            raise ValueError(f"{source}: missing (--columns maps it to '{target}'); the row's columns are "
                             f"{', '.join(map(str, row))}")
        out[target] = row[source]
    return out
