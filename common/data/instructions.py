"""Instruction and plain-text data from the user's JSON lines files, for a causal language model.

Three row shapes, the first two the ones instruction-tuning tools share:

- ``{"prompt": "...", "completion": "..."}``: one user turn, and the answer the loss is taken on;
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: a chat whose
  last message is the assistant's answer (the target); the turns before it are the prompt;
- ``{"text": "..."}``: plain text (no prompt), the loss taken on every token (Shakespeare's
  speeches, for instance).

A file holds one shape in every row.  A JSON lines file whose first row has none of these shapes,
or has the classification text *and* label columns, is a classification table
(:mod:`privet.common.data.files`).  Every bad row is one :class:`~privet.common.errors.DataError`
naming ``file:line`` and the fix.  :func:`write_generation` writes examples back in these shapes
(``privet sites``), so they load back as the same examples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from privet.common.data.examples import GenerationExamples, Turn
from privet.common.errors import DataError

__all__ = ["INSTRUCTION_SUFFIXES", "file_shape", "load_instructions", "write_generation"]

#: File types that may hold instruction rows (JSON lines).
INSTRUCTION_SUFFIXES = (".jsonl", ".json")
_ROLES = ("system", "user", "assistant")
_SHAPES_HELP = (
    "each row must be {'prompt': ..., 'completion': ...} or {'messages': [{'role': ..., "
    "'content': ...}, ...]} (instructions), {'text': ...} (plain text), or hold the text and "
    "label columns (classification)"
)
#: The key of a plain-text row (fixed, like ``prompt`` and ``messages``).
TEXT_KEY = "text"

Shape = Literal["instructions", "classification"]


def _first_row(path: Path) -> tuple[int, str] | None:
    """The first non-blank line of a JSON lines file and its number, or None when there is none."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8", errors="replace").strip()
            if line:
                return lineno, line
    return None


def file_shape(path: Path, *, text_column: str, label_column: str) -> Shape:
    """Whether a data file holds generation rows (for a causal LM) or classification rows.

    CSV and Parquet files, JSON files holding one array, and files that cannot be read here are
    classification tables (their loader reports any problem).  A JSON lines file is decided by its
    first row: ``prompt``/``completion`` or ``messages`` make it instructions; the text and label
    columns make it a classification table; else a ``text`` key makes it plain text, which
    :func:`load_instructions` reads too (``"instructions"`` stands for both).

    Raises
    ------
    DataError
        When a JSON lines file's first row is an object with neither shape.

    """
    path = Path(path)
    if path.suffix.lower() not in INSTRUCTION_SUFFIXES or not path.is_file():
        return "classification"
    try:
        first = _first_row(path)
    except OSError:
        return "classification"
    if first is None or not first[1].startswith("{"):
        return "classification"
    lineno, line = first
    try:
        row = json.loads(line)
    except ValueError:
        return "classification"  # the table loader says which line is not JSON
    if not isinstance(row, dict):
        return "classification"
    if {"prompt", "completion", "messages"} & set(row):
        return "instructions"
    if text_column in row and label_column in row:
        return "classification"
    if TEXT_KEY in row:
        return "instructions"  # plain text: rows of a causal LM, read by load_instructions
    raise DataError(
        f"{path}:{lineno}: the row has the keys {sorted(row)[:8]}, which fit neither kind of data "
        f"file: {_SHAPES_HELP} (data.text_column = {text_column!r}, data.label_column = "
        f"{label_column!r})",
        fix="rename the keys, or set data.text_column / data.label_column",
    )


def _text(value: Any, where: str, what: str, fix: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, not {type(value).__name__}", fix=fix)
    if not value.strip():
        raise DataError(f"{where}: {what} is empty", fix=fix)
    return value


def _prompt_completion(row: dict[str, Any], where: str) -> tuple[tuple[Turn, ...], str]:
    if "prompt" not in row:
        raise DataError(
            f"{where}: the row has a 'completion' but no 'prompt'",
            fix="add the prompt the completion answers",
        )
    if "completion" not in row:
        raise DataError(
            f"{where}: the row has a 'prompt' but no 'completion' (the answer the model learns)",
            fix="add a non-empty 'completion' to the row, or drop the row",
        )
    prompt = _text(row["prompt"], where, "'prompt'", "write the prompt as a non-empty string")
    completion = _text(
        row["completion"], where, "'completion'", "write the answer as a non-empty string"
    )
    return (Turn("user", prompt),), completion


def _chat(row: dict[str, Any], where: str) -> tuple[tuple[Turn, ...], str]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}}",
            fix="write the chat as a list of messages ending with the assistant's answer",
        )
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f"{at} must be an object with 'role' and 'content'",
                fix="write each message as {'role': 'user', 'content': '...'}",
            )
        role = message["role"]
        if role not in _ROLES:
            raise DataError(
                f"{at} has the unknown role {role!r}",
                fix=f"use one of {list(_ROLES)}",
            )
        content = message["content"]
        if not isinstance(content, str):
            raise DataError(
                f"{at}: 'content' must be a string, not {type(content).__name__}",
                fix="write the message's text as a string",
            )
        turns.append(Turn(role, content))
    if turns[-1].role != "assistant":
        raise DataError(
            f"{where}: the last message is from {turns[-1].role!r}, not the assistant; the last "
            "message is the answer the model learns",
            fix="end each chat with the assistant's answer",
        )
    if not turns[-1].content.strip():
        raise DataError(
            f"{where}: the assistant's answer (the last message) is empty",
            fix="write the answer, or drop the row",
        )
    if not any(t.role == "user" for t in turns[:-1]):
        raise DataError(
            f"{where}: no user message comes before the assistant's answer",
            fix="add the user's message the answer replies to",
        )
    return tuple(turns[:-1]), turns[-1].content


def _plain(row: dict[str, Any], where: str) -> tuple[None, str]:
    fix = "write the text as a non-empty string, or drop the row"
    return None, _text(row[TEXT_KEY], where, f"{TEXT_KEY!r}", fix)


_SHAPE_NAMES = {"chat": "a chat row", "pair": "a prompt/completion row", "text": "a text row"}
_SHAPE_PLURALS = {"chat": "chats", "pair": "prompt/completion rows", "text": "text rows"}


def _load_file(path: Path, client_column: str | None) -> GenerationExamples:
    targets: list[str] = []
    prompts: list[tuple[Turn, ...] | None] = []
    clients: list[str] = []
    kind: str | None = None
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(
                    f"{where}: the line is not UTF-8 text", fix="save it as UTF-8"
                ) from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(
                    f"{where}: the line is not JSON ({exc.args[0] if exc.args else exc})",
                    fix="write one JSON object per line",
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{where}: the line is a JSON {type(row).__name__}, not an object",
                    fix="write one JSON object per line",
                )
            shape = (
                "chat"
                if "messages" in row
                else "pair"
                if {"prompt", "completion"} & set(row)
                else "text"
                if TEXT_KEY in row
                else None
            )
            if shape is None:
                raise DataError(
                    f"{where}: the row has the keys {sorted(row)[:8]}, but this file holds "
                    f"data for a causal language model: {_SHAPES_HELP}",
                    fix="give the row a 'prompt' and a 'completion', 'messages', or a 'text'",
                )
            if kind is not None and shape != kind:
                raise DataError(
                    f"{where}: the row is {_SHAPE_NAMES[shape]}, the rows before it are "
                    f"{_SHAPE_PLURALS[kind]}",
                    fix="use one row shape per file",
                )
            kind = shape
            turns: tuple[Turn, ...] | None
            if shape == "chat":
                turns, target = _chat(row, where)
            elif shape == "pair":
                turns, target = _prompt_completion(row, where)
            else:
                turns, target = _plain(row, where)
            if client_column is not None:
                value = row.get(client_column)
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise DataError(
                        f"{where}: the row names no client in {client_column!r}",
                        fix="name a client in every row (data.client_column)",
                    )
                clients.append(str(value))
            prompts.append(turns)
            targets.append(target)
    if not targets:
        raise DataError(f"data file {path} has no rows.", fix="add at least one example")
    keys = {"client": clients} if client_column is not None else {}
    return GenerationExamples(targets=targets, prompts=prompts, keys=keys)


def load_instructions(
    paths: Sequence[Path], *, client_columns: Sequence[str | None] | None = None
) -> list[GenerationExamples]:
    """Load instruction or plain-text JSON lines files, one dataset per file.

    Parameters
    ----------
    paths
        ``.jsonl`` (or JSON lines ``.json``) files, in UTF-8, one object per line; blank lines
        are skipped. Each file holds one row shape: prompt/completion, chat ``messages``, or
        plain ``text``.
    client_columns
        Per file, the key naming each row's client (stored as the key ``"client"``), or None.

    Returns
    -------
    list of GenerationExamples
        Rows in file order; ``prompts[i]`` holds the turns before the answer (``None`` for a
        plain text), ``targets[i]`` the answer (the text).

    Raises
    ------
    DataError
        For the first bad row: not JSON, a missing or empty completion or text, an unknown
        role, a chat that does not end with the assistant, a row of another shape than the
        first, a missing client; naming ``file:line`` and the fix.

    """
    columns = list(client_columns) if client_columns is not None else [None] * len(paths)
    out = []
    for path, column in zip(paths, columns, strict=True):
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"data file {path} does not exist.", fix="check data.train_files / data.test_file"
            )
        out.append(_load_file(path, column))
    return out


def write_generation(path: Path, examples: GenerationExamples) -> None:
    """Write ``examples`` as a JSON lines file that :func:`load_instructions` reads back as them.

    A chat example becomes a ``messages`` row (its prompt turns, then the target as the
    assistant's message), a plain text a ``text`` row; keys and answer choices are not written.

    Raises
    ------
    DataError
        When ``examples`` mixes chats and plain texts (a file holds one row shape).

    """
    chats = {p is not None for p in examples.prompts}
    if len(chats) > 1:
        raise DataError(
            f"cannot write {path}: the examples mix chats and plain texts, and a file holds one "
            "row shape",
            fix="write the chats and the plain texts to separate files",
        )
    with Path(path).open("w", encoding="utf-8") as fh:
        for turns, target in zip(examples.prompts, examples.targets, strict=True):
            if turns is None:
                row: dict[str, Any] = {TEXT_KEY: target}
            else:
                messages = [{"role": t.role, "content": t.content} for t in turns]
                row = {"messages": [*messages, {"role": "assistant", "content": target}]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
