"""Prompt templates of decoder rerankers, as data, and the pair encoding they imply (no torch).

A decoder reranker (Qwen3-Reranker, bge-reranker-v2-gemma) reads each (query, document) pair as one prompt and
is scored at the prompt's last token: logit("yes") - logit("no") there (or logit("Yes") alone). The prompt is

    prefix + body(query, document) + suffix

where the body ends with the document, and the suffix is where the model is asked for its answer (Qwen3: the
assistant's turn with its empty think block; bge-reranker-v2-gemma: its question), so the model's next token
is its answer. The instruction field sits in the body (Qwen3's `<Instruct>`) or in the suffix (Gemma's
question). Encoding follows each model's reference code: prefix and suffix are tokenized alone, the body as
one text, or, where the reference tokenizes it in pieces (FlagEmbedding: query, separator, passage, each
alone), piece by piece (a template field given as a list of texts). A body over budget loses tokens from its
end, i.e. the document's tail; when the query alone leaves no room, the query is cut and the document
dropped. Prefix, suffix and the field labels are never cut: a truncated pair still ends where the model
reads its answer.

Which template a checkpoint takes: `tokenizer.template` (a built-in name or a JSON file of the fields below);
unset, the checkpoint's config.json key `rerank_pipeline_template` (dummy checkpoints write it), else the
model's name (a hub id or folder containing "qwen3-reranker", "bge-reranker-v2-gemma" or
"mxbai-rerank-<size>-v2"). A decoder checkpoint with none of these is refused: its scores would mean nothing
without the prompt it was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.model.checkpoint import read_config
from pipeline.model.decoder_config import DECODER_LAYOUTS
from pipeline.model.decoder_dummy import TEMPLATE_KEY

FIELDS = ("instruction", "query", "document")
FIELD = re.compile(r"{(instruction|query|document)}")

# A template text: one string, tokenized whole, or pieces tokenized one by one and their ids concatenated.
Text = str | tuple[str, ...]


def pieces(text: Text) -> tuple[str, ...]:
    """A template text as its pieces (one for a plain string)."""
    return (text,) if isinstance(text, str) else tuple(text)


def _fields(text: Text) -> list[str]:
    """The {field} names in a template text, piece by piece (a field split across two pieces is none)."""
    return [name for piece in pieces(text) for name in re.findall(r"{(\w*)}", piece)]


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    prefix: Text  # before the fields: system turn, start of the user turn, BOS
    body: Text  # {query} then {document}, the document last; {instruction} before them, or in the suffix
    suffix: Text  # after the fields: where the model is asked for its answer (its answer follows)
    yes_token: str  # the score is logit(yes_token) - logit(no_token) at the last token
    no_token: str | None  # None: the score is logit(yes_token) alone
    default_instruction: str

    def __post_init__(self):
        for field in ("prefix", "body", "suffix"):  # a JSON file gives lists: kept as tuples
            value = getattr(self, field)
            if not isinstance(value, str):
                if (
                    not isinstance(value, list | tuple)
                    or not value
                    or not all(isinstance(p, str) for p in value)
                ):
                    raise ConfigError(
                        f"prompt template {self.name!r}: {field} must be a text or a non-empty list "
                        "of texts"
                    )
                object.__setattr__(self, field, tuple(value))
        body = _fields(self.body)
        suffix = _fields(self.suffix)
        prefix = _fields(self.prefix)
        placed = tuple(body) in (FIELDS, FIELDS[1:]) and tuple(body + suffix) in (
            FIELDS,
            FIELDS[1:] + FIELDS[:1],
        )
        if not placed or prefix or not pieces(self.body)[-1].endswith("{document}"):
            raise ConfigError(
                f"prompt template {self.name!r}: its body must hold {{query}} and {{document}} once "
                "each, in that order, and end with {document}; {instruction} once, before {query} "
                "or in the suffix; the prefix holds no field (found body "
                f"{body}, suffix {suffix}, prefix {prefix})"
            )

    @property
    def pieced(self) -> bool:
        """Whether a text of it is tokenized in pieces (a plain-text encoding of the pair would differ)."""
        return any(not isinstance(getattr(self, f), str) for f in ("prefix", "body", "suffix"))

    def as_dict(self) -> dict:
        """Every field: what the score cache's fingerprint and a job's summary record."""
        return dataclasses.asdict(self)


QWEN3_RERANKER = PromptTemplate(
    name="qwen3-reranker",
    # Verbatim from the Qwen/Qwen3-Reranker-0.6B model card's usage code (same for 4B and 8B).
    prefix=(
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
        'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
        "<|im_start|>user\n"
    ),
    body="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    yes_token="yes",
    no_token="no",
    default_instruction="Given a web search query, retrieve relevant passages that answer the query",
)

# FlagEmbedding's BaseLLMReranker (FlagLLMReranker), FlagEmbedding/inference/reranker/decoder_only/base.py:
# BOS, then tokenizer("A: " + query), tokenizer("\n"), tokenizer("B: " + passage), each tokenized alone
# (query_instruction_for_rerank "A: ", passage_instruction_for_rerank "B: " with the format "{}{}") and
# truncated from the passage's end ('only_second'), then tokenizer("\n") and tokenizer(prompt) appended
# whole; the score is the logit of tokenizer("Yes")[0] at the last token. Its `prompt` argument (our
# instruction) replaces the default question. Lengths are counted otherwise: FlagEmbedding's max_length=N caps
# "A: " + query at 3/4 N tokens, "B: " + passage at N, and BOS + query + "\n" + passage at N + S (S: the tokens
# of "\n" and the question), then appends those S; here max_length bounds the whole prompt, and the passage's
# tail goes first (the query is cut only when it alone leaves no room). A passage cut there is cut here alike
# at the same total length.
BGE_RERANKER_V2_GEMMA = PromptTemplate(
    name="bge-reranker-v2-gemma",
    prefix="<bos>",
    body=("A: {query}", "\n", "B: {document}"),
    suffix=("\n", "{instruction}"),
    yes_token="Yes",
    no_token=None,
    default_instruction=(
        "Given a query A and a passage B, determine whether the passage contains an answer to the "
        "query by providing a prediction of either 'Yes' or 'No'."
    ),
)

# mixedbread-ai/mxbai-rerank-base-v2 and -large-v2 (Qwen2 causal LMs), as mxbai_rerank/mxbai_rerank_v2.py of
# github.com/mixedbread-ai/mxbai-rerank encodes a pair (MxbaiRerankV2.prepare_inputs, concat_input_ids): the
# chat prefix, tokenizer("query: " + query), tokenizer("\n"), tokenizer("document: " + document), each alone,
# then tokenizer("\n"), the task prompt and the chat suffix; the score is logit("1") - logit("0") at the last
# token. Its instruction is optional: given, the query's text becomes "instruction: {instruction}\nquery:
# {query}", still one text; here the instruction field is that text's start, empty by default, so an
# instruction is given with its label and newline ("instruction: Find code that ...\n") to be read as
# mxbai's. Lengths are counted otherwise: mxbai's max_length excludes the template and caps the query at 3/4
# of it; here max_length bounds the whole prompt and the document's tail goes first.
MXBAI_RERANK_V2 = PromptTemplate(
    name="mxbai-rerank-v2",
    prefix=(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\n"
    ),
    body=("{instruction}query: {query}", "\n", "document: {document}"),
    suffix=(
        "\n",
        "You are a search relevance expert who evaluates how well documents match search queries. "
        "For each query-document pair, carefully analyze the semantic relationship between them, "
        "then provide your binary relevance judgment (0 for not relevant, 1 for relevant).\n"
        "Relevance:",
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
    yes_token="1",
    no_token="0",
    default_instruction="",
)

TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t for t in (QWEN3_RERANKER, BGE_RERANKER_V2_GEMMA, MXBAI_RERANK_V2)
}
# Checkpoint names (hub id, folder, dummy name) whose template is known without being told.
KNOWN_BY_NAME: tuple[tuple[str, str], ...] = (
    (r"(?i)qwen3[-_]reranker", "qwen3-reranker"),
    (r"(?i)bge[-_]reranker[-_]v2[-_]gemma", "bge-reranker-v2-gemma"),
    (r"(?i)mxbai[-_]rerank[-_]\w+[-_]v2", "mxbai-rerank-v2"),
)
CONFIG_KEY = TEMPLATE_KEY  # config.json key naming a checkpoint's template


def _from_file(path: str) -> PromptTemplate:
    try:
        with open(os.path.expanduser(path)) as f:
            fields = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"prompt template file {path!r} does not read as JSON ({e})") from None
    names = {f.name for f in dataclasses.fields(PromptTemplate)} - {"name"}
    if not isinstance(fields, dict) or set(fields) - {"name"} != names:
        raise ConfigError(
            f"prompt template file {path!r} must be a JSON object with exactly the keys "
            f"{', '.join(sorted(names))} (and optionally name)"
        )
    return PromptTemplate(**{"name": os.path.basename(path)} | fields)


def template_named(setting: str) -> PromptTemplate:
    """A built-in template by name, or a JSON file of a template's fields."""
    if setting in TEMPLATES:
        return TEMPLATES[setting]
    if setting.endswith(".json"):
        return _from_file(setting)
    raise ConfigError(
        f"unknown prompt template {setting!r}; built in: {', '.join(sorted(TEMPLATES))}, or give "
        "a JSON file of the fields (prefix, body, suffix, yes_token, no_token, default_instruction)"
    )


def resolve_template(
    setting: str | None, model: str, directory: str, layout: str | None
) -> PromptTemplate | None:
    """The template pairs of `model` (checkpoint in `directory`, of `layout`) are encoded with; None for a
    cross-encoder, which reads pairs without a prompt. `setting`: `tokenizer.template` (None: known one)."""
    decoder = layout in DECODER_LAYOUTS
    if layout is None and setting is not None:  # pickle-only: its layout is found when it loads
        return template_named(setting)
    if not decoder:
        if setting is not None:
            raise ConfigError(
                f"tokenizer.template is set, but {model} is a cross-encoder ({layout} layout), which "
                "reads pairs without a prompt; remove tokenizer.template"
            )
        return None
    if setting is not None:
        return template_named(setting)
    raw_config = read_config(directory)
    if raw_config.get(CONFIG_KEY):
        return template_named(raw_config[CONFIG_KEY])
    for pattern, name in KNOWN_BY_NAME:
        if re.search(pattern, model):
            return TEMPLATES[name]
    raise CheckpointError(
        f"{model} is a decoder reranker ({layout} layout) and its prompt template is not known; name "
        f"one with `--set tokenizer.template=<name>` (built in: {', '.join(sorted(TEMPLATES))}) or "
        "give a JSON file of the fields (prefix, body, suffix, yes_token, no_token, "
        "default_instruction); the key is rerank.tokenizer.template in the jobs that rerank as a "
        "step, scoring.template in the evaluation suite, template= in Python"
    )


class PromptEncoder:
    """Encodes (query, document) pairs through a template on the checkpoint's fast tokenizer."""

    def __init__(self, tokenizer, template: PromptTemplate, instruction: str | None = None):
        """tokenizer: a `tokenizers.Tokenizer` (no padding, no truncation)."""
        self.tokenizer = tokenizer
        self.template = template
        self.instruction = template.default_instruction if instruction is None else instruction
        self.prefix_ids = self._text_ids(template.prefix)
        self.suffix_ids = self._text_ids(template.suffix)
        self.body_pieces = pieces(template.body)
        # The body split at its fields: text before {query}, between {query} and {document}.
        before_query, rest = "".join(self.body_pieces).split("{query}")
        self.query_head = self._fill(before_query)
        self.document_label = rest.split("{document}")[0]
        self.document_label_ids = self._label_ids()
        self.answer_ids = self._answer_ids()

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _fill(self, text: str, query: str = "", document: str = "") -> str:
        """`text` with its fields filled in one pass (a query holding "{document}" stays as it is)."""
        values = {"instruction": self.instruction, "query": query, "document": document}
        return FIELD.sub(lambda m: values[m.group(1)], text)

    def _text_ids(self, text: Text, query: str = "", document: str = "") -> list[int]:
        """Token ids of a template text with its fields filled, its pieces tokenized one by one."""
        return [i for piece in pieces(text) for i in self._ids(self._fill(piece, query, document))]

    def _label_ids(self) -> list[int]:
        """The document label's ids (the text between {query} and {document}), piece by piece."""
        body = self.body_pieces
        first = next(i for i, piece in enumerate(body) if "{query}" in piece)
        parts = [body[first].split("{query}")[1]] + list(body[first + 1 :])
        parts[-1] = parts[-1].split("{document}")[0]  # the body's last piece holds {document}
        return [i for part in parts if part for i in self._ids(part)]

    def _answer_ids(self) -> tuple[int, int | None]:
        def one(token: str) -> int:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is None:
                raise CheckpointError(
                    f"prompt template {self.template.name!r} reads the answer token {token!r}, which "
                    "this checkpoint's tokenizer does not have as one token; is it the right template?"
                )
            return token_id

        no = self.template.no_token
        return one(self.template.yes_token), (None if no is None else one(no))

    @property
    def min_length(self) -> int:
        """The shortest max_length that leaves a token for the query and one for the document."""
        fixed = len(self.prefix_ids) + len(self.suffix_ids)
        return fixed + len(self._text_ids(self.template.body)) + 2

    def encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        max_length: int,
        max_chars: int | None = None,
    ) -> list[np.ndarray]:
        """Token ids per pair, each (seqlen,) int32 with seqlen <= max_length, ending with the suffix.

        `max_chars`: texts are cut to this many characters first (see `PairTokenizer`)."""
        if max_length < self.min_length:
            raise ValueError(
                f"max_length={max_length} leaves no room for text in the "
                f"{self.template.name} prompt; use at least {self.min_length}"
            )

        def cap(text: str) -> str:
            return text if max_chars is None or len(text) <= max_chars else text[:max_chars]

        queries = [cap(q) for q in queries]
        documents = [cap(d) for d in documents]
        n = len(self.body_pieces)
        texts = [
            self._fill(piece, q, d)
            for q, d in zip(queries, documents)
            for piece in self.body_pieces
        ]
        budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        out = []
        for k, query in enumerate(queries):
            parts = list(zip(texts[k * n : (k + 1) * n], encodings[k * n : (k + 1) * n]))
            ids = parts[0][1].ids if n == 1 else [i for _, e in parts for i in e.ids]
            if len(ids) > budget:
                offsets = _joined_offsets(parts)  # character spans in the filled body
                document_start = len(self.query_head) + len(query) + len(self.document_label)
                # Tokens ending by the document's first character belong to the head (the label's space
                # merges into the document's first word, so that token counts as the document's).
                head = sum(1 for _, end in offsets if end <= document_start)
                if head < budget:
                    ids = ids[:budget]  # the document's tail goes, as in the model card's code
                else:
                    ids = self._cut_query(ids, offsets, query, budget)
            out.append(np.asarray(self.prefix_ids + ids + self.suffix_ids, dtype=np.int32))
        return out

    def _cut_query(self, ids, offsets, query: str, budget: int) -> list[int]:
        """Instruction and query label, the query's first tokens, the document label, no document."""
        query_start, query_end = len(self.query_head), len(self.query_head) + len(query)
        head = [i for i, (_, end) in zip(ids, offsets) if end <= query_start]
        query_ids = [
            i for i, (start, end) in zip(ids, offsets) if end > query_start and start < query_end
        ]
        room = max(0, budget - len(head) - len(self.document_label_ids))
        return head + query_ids[:room] + self.document_label_ids


def _joined_offsets(parts) -> list[tuple[int, int]]:
    """(start, end) character spans of each token in the concatenation of separately tokenized texts.

    parts: (text, tokenizers.Encoding) per piece, in order."""
    offsets, shift = [], 0
    for text, encoding in parts:
        offsets.extend((start + shift, end + shift) for start, end in encoding.offsets)
        shift += len(text)
    return offsets
