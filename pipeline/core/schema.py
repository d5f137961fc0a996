"""Column names shared by every stage, written down once.

Input (long format, one row per pair):   query_id, query, doc_id, document, [carried columns...]
Input (grouped format, one row per query): query_id, query, candidates: list<struct<doc_id, document>>
After tokenize:  + input_ids: list<int32>, token_type_ids: list<int8> (BERT only), num_tokens: int32
After score:     + score: float32 (raw logit)
After rank:      + rank: int32 (1 = best within its query; ties by doc_id)
Rejected rows:   the input columns + reason: string
Qrels:           query_id, doc_id, label (int)
"""

QUERY_ID = "query_id"
QUERY = "query"
DOC_ID = "doc_id"
DOCUMENT = "document"
CANDIDATES = "candidates"

INPUT_IDS = "input_ids"
TOKEN_TYPE_IDS = "token_type_ids"
NUM_TOKENS = "num_tokens"
WINDOW = "window"  # index of a document window when long documents are split

SCORE = "score"
RANK = "rank"
REASON = "reason"
LABEL = "label"

# First-stage columns that the rerank input may carry.
FIRST_STAGE_RANK = "first_stage_rank"
FIRST_STAGE_SCORE = "first_stage_score"

# Internal columns: they travel between the stages and never reach ranked/ or rejected/.
SHARD = "_shard"  # int32: the input shard a row came from
ROW = "_row"  # int64: shard << 32 | pair index within the shard, the row's key everywhere
NUM_WINDOWS = "num_windows"  # int32: windows of the row's document (all share its _row)
NO_CANDIDATES_FLAG = "_no_candidates"  # bool: a grouped query without candidates (one rejected row)
BEST = "_best"  # float: a row's best window score, while ranking
# Score cache (cache.uri set): see pipeline/rerank/cache.py.
CACHE_KEY = "_cache_key"  # fixed_size_binary(16): hash of (model fingerprint, query, document)
CACHED = "_cached"  # int8: 0 score it, 1 cache hit, 2 same texts as another pair of this run
CACHED_SCORE = "_cached_score"  # float32: the cached logit of a hit (null otherwise)
