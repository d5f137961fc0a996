"""Tokenize pairs on CPU actors into unpadded token lists, sorted by length within the batch.

Adds:  input_ids list<int32>, token_type_ids list<int8> (BERT only), num_tokens int32, window int32,
       num_windows int32 (windows of the row's document; the driver checks all of them were written).
Valid rows lose their texts here (set to null): from now on only token ids travel, unless
`output.carry_texts` asks for them in ranked/. Pairs the score cache answered (`_cached` != 0) get no tokens
(num_windows 1, window 0) and pass through. Rejected rows keep theirs for `rejected/`. In `windows`
mode a long document becomes several rows (window 0, 1, ...) that share its `_row`; the ranking stage
keeps the best window (jina's rerank semantics).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema as S
from pipeline.model.checkpoint import inspect_checkpoint, resolve_model_directory
from pipeline.model.templates import resolve_template
from pipeline.model.tokenization import PairTokenizer
from pipeline.rerank.config import TokenizerConfig

NUM_WINDOWS = S.NUM_WINDOWS


def list_column(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """list<value_type> from numpy arrays, built from one flat buffer and offsets (no per-row objects)."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def list_to_numpy(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """The inverse of `list_column`: zero-copy numpy views, one per row."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


class TokenizeStage:
    def __init__(
        self, model: str, revision: str | None, config: TokenizerConfig, keep_texts: bool = False
    ):
        """keep_texts: leave valid rows' texts in place (`output.carry_texts`) instead of nulling them."""
        directory, _ = resolve_model_directory(model, revision)
        # Headers and config.json only (never unpickles): whether pickles may load is the scorer's question.
        layout, model_config = inspect_checkpoint(directory, allow_pickle=True)
        self.return_token_types = model_config.type_vocab_size > 1
        self.tokenizer = PairTokenizer.from_dir(
            directory,
            return_token_types=self.return_token_types,
            max_chars_per_token=config.max_chars_per_token,
            # A decoder reranker's prompt template (None for cross-encoders).
            prompt=resolve_template(config.template, model, directory, layout and layout.name),
            instruction=config.instruction,
        )
        self.config = config
        self.keep_texts = keep_texts
        self.max_length = min(config.max_length, model_config.max_tokens_per_sequence)

    def __call__(self, batch: pa.Table) -> pa.Table:
        valid = pc.is_null(batch.column(S.REASON)).to_numpy(zero_copy_only=False)
        # Pairs the score cache answered (or that wait for a pair of the same texts) need no tokens.
        cached = (
            (batch.column(S.CACHED).to_numpy() != 0)
            if S.CACHED in batch.column_names
            else np.zeros(len(valid), bool)
        )
        work_index = np.flatnonzero(valid & ~cached)
        queries = batch.column(S.QUERY).take(work_index).to_pylist()
        documents = batch.column(S.DOCUMENT).take(work_index).to_pylist()
        if self.config.long_documents == "windows":
            ids, types, source, window = self._windows(queries, documents)
            source = work_index[source]
        else:
            ids, types = self.tokenizer.encode_pairs(queries, documents, self.max_length)
            source, window = work_index, np.zeros(len(work_index), dtype=np.int32)
        rest_index = np.flatnonzero(
            ~valid | cached
        )  # rejected rows and cached pairs: no tokens, at the end
        # Longest first: the scorer's micro-batches then hold similar lengths.
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        take = np.concatenate([source[order], rest_index]).astype(np.int64)
        out = batch.take(pa.array(take))
        n_rest = len(rest_index)
        empty = [np.zeros(0, np.int32)] * n_rest
        # Rejected rows keep their texts for rejected/; scored pairs only with output.carry_texts.
        keep_text = pa.array(
            np.concatenate(
                [
                    np.full(len(order), self.keep_texts, bool),
                    np.where(valid[rest_index], self.keep_texts, True),
                ]
            )
        )
        for name in (S.QUERY, S.DOCUMENT):
            col = out.column(name)
            out = out.set_column(
                out.schema.get_field_index(name),
                name,
                pc.if_else(keep_text, col, pa.nulls(len(col), pa.string())),
            )
        out = out.append_column(
            S.INPUT_IDS, list_column([ids[i] for i in order] + empty, pa.int32())
        )
        if self.return_token_types:
            out = out.append_column(
                S.TOKEN_TYPE_IDS,
                list_column([types[i] for i in order] + [np.zeros(0, np.int8)] * n_rest, pa.int8()),
            )
        out = out.append_column(
            S.NUM_TOKENS, pa.array(np.concatenate([lengths[order], np.zeros(n_rest, np.int32)]))
        )
        out = out.append_column(
            S.WINDOW, pa.array(np.concatenate([window[order], np.zeros(n_rest, np.int32)]))
        )
        per_row = np.bincount(source, minlength=batch.num_rows).astype(np.int32)
        # A cached pair stands as one row (its best window's score); a rejected row has no windows.
        rest_windows = valid[rest_index].astype(np.int32)
        return out.append_column(
            NUM_WINDOWS, pa.array(np.concatenate([per_row[source[order]], rest_windows]))
        )

    def _windows(self, queries, documents):
        ids, types, source, window = [], [], [], []
        by_query: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            by_query.setdefault(q, []).append(i)
        for q, rows in by_query.items():
            w_ids, w_types, owners = self.tokenizer.windows(
                q,
                [documents[i] for i in rows],
                self.max_length,
                self.config.max_query_length,
                self.config.overlap,
            )
            counter: dict[int, int] = {}
            for k, owner in enumerate(owners):
                ids.append(w_ids[k])
                types.append(w_types[k] if w_types is not None else None)
                source.append(rows[owner])
                window.append(counter.get(owner, 0))
                counter[owner] = counter.get(owner, 0) + 1
        return (
            ids,
            (types if self.return_token_types else None),
            np.asarray(source, dtype=np.int64),
            np.asarray(window, dtype=np.int32),
        )
