from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VocabMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOCAB_NATIVE: _ClassVar[VocabMode]
    VOCAB_SLEM: _ClassVar[VocabMode]
    VOCAB_TLI: _ClassVar[VocabMode]
VOCAB_NATIVE: VocabMode
VOCAB_SLEM: VocabMode
VOCAB_TLI: VocabMode

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("session_id", "base_len", "base_fingerprint", "tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_LEN_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    base_len: int
    base_fingerprint: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., base_len: _Optional[int] = ..., base_fingerprint: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class SparseDist(_message.Message):
    __slots__ = ("ids", "probs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "vocab_size", "max_context", "eos_token_ids", "dtype", "device", "tokenizer_fingerprint", "wire_tokenizer_fingerprint", "shared_tokens", "weights", "runtime")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WIRE_TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    model: str
    vocab_size: int
    max_context: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    device: str
    tokenizer_fingerprint: str
    wire_tokenizer_fingerprint: str
    shared_tokens: int
    weights: str
    runtime: str
    def __init__(self, model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., wire_tokenizer_fingerprint: _Optional[str] = ..., shared_tokens: _Optional[int] = ..., weights: _Optional[str] = ..., runtime: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("model", "runtime", "pid", "uptime_seconds", "rss_bytes", "sessions", "calls", "context_hits", "context_misses", "full_contexts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_HITS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_MISSES_FIELD_NUMBER: _ClassVar[int]
    FULL_CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    runtime: str
    pid: int
    uptime_seconds: float
    rss_bytes: int
    sessions: int
    calls: int
    context_hits: int
    context_misses: int
    full_contexts: int
    def __init__(self, model: _Optional[str] = ..., runtime: _Optional[str] = ..., pid: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., sessions: _Optional[int] = ..., calls: _Optional[int] = ..., context_hits: _Optional[int] = ..., context_misses: _Optional[int] = ..., full_contexts: _Optional[int] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("context", "k", "sampling", "seed", "vocab", "continue_k", "continue_seed")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_K_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_SEED_FIELD_NUMBER: _ClassVar[int]
    context: Context
    k: int
    sampling: Sampling
    seed: int
    vocab: VocabMode
    continue_k: int
    continue_seed: int
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., k: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., seed: _Optional[int] = ..., vocab: _Optional[_Union[VocabMode, str]] = ..., continue_k: _Optional[int] = ..., continue_seed: _Optional[int] = ...) -> None: ...

class StringDraft(_message.Message):
    __slots__ = ("text", "candidates", "probs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    candidates: _containers.RepeatedScalarFieldContainer[bytes]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, text: _Optional[bytes] = ..., candidates: _Optional[_Iterable[bytes]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class ProposeStringsRequest(_message.Message):
    __slots__ = ("context", "k", "sampling", "seed")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    context: Context
    k: int
    sampling: Sampling
    seed: int
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., k: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class ProposeStringsResponse(_message.Message):
    __slots__ = ("context_miss", "draft", "compute_seconds")
    CONTEXT_MISS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    context_miss: bool
    draft: _containers.RepeatedCompositeFieldContainer[StringDraft]
    compute_seconds: float
    def __init__(self, context_miss: _Optional[bool] = ..., draft: _Optional[_Iterable[_Union[StringDraft, _Mapping]]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("context_miss", "tokens", "q", "compute_seconds", "continued")
    CONTEXT_MISS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONTINUED_FIELD_NUMBER: _ClassVar[int]
    context_miss: bool
    tokens: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[SparseDist]
    compute_seconds: float
    continued: bool
    def __init__(self, context_miss: _Optional[bool] = ..., tokens: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ..., compute_seconds: _Optional[float] = ..., continued: _Optional[bool] = ...) -> None: ...

class ReviewRequest(_message.Message):
    __slots__ = ("context", "draft", "q", "sampling", "seed")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    context: Context
    draft: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[SparseDist]
    sampling: Sampling
    seed: int
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., draft: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class ReviewResponse(_message.Message):
    __slots__ = ("context_miss", "accepted", "tokens", "q", "compute_seconds")
    CONTEXT_MISS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    context_miss: bool
    accepted: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[SparseDist]
    compute_seconds: float
    def __init__(self, context_miss: _Optional[bool] = ..., accepted: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class DraftTree(_message.Message):
    __slots__ = ("tokens", "parents", "q")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[SparseDist]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ...) -> None: ...

class TreeShape(_message.Message):
    __slots__ = ("branching", "budget")
    BRANCHING_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    branching: _containers.RepeatedScalarFieldContainer[int]
    budget: int
    def __init__(self, branching: _Optional[_Iterable[int]] = ..., budget: _Optional[int] = ...) -> None: ...

class ProposeTreeRequest(_message.Message):
    __slots__ = ("context", "shape", "sampling", "seed")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    context: Context
    shape: TreeShape
    sampling: Sampling
    seed: int
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., shape: _Optional[_Union[TreeShape, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class ProposeTreeResponse(_message.Message):
    __slots__ = ("context_miss", "tree", "compute_seconds", "drafter_forwards")
    CONTEXT_MISS_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    context_miss: bool
    tree: DraftTree
    compute_seconds: float
    drafter_forwards: int
    def __init__(self, context_miss: _Optional[bool] = ..., tree: _Optional[_Union[DraftTree, _Mapping]] = ..., compute_seconds: _Optional[float] = ..., drafter_forwards: _Optional[int] = ...) -> None: ...

class ProposeBeamsRequest(_message.Message):
    __slots__ = ("hidden", "last_token", "width", "depth")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LAST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    hidden: bytes
    last_token: int
    width: int
    depth: int
    def __init__(self, hidden: _Optional[bytes] = ..., last_token: _Optional[int] = ..., width: _Optional[int] = ..., depth: _Optional[int] = ...) -> None: ...

class ProposeBeamsResponse(_message.Message):
    __slots__ = ("tree", "compute_seconds")
    TREE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tree: DraftTree
    compute_seconds: float
    def __init__(self, tree: _Optional[_Union[DraftTree, _Mapping]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("context", "draft", "q", "sampling", "seed", "or_plain")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OR_PLAIN_FIELD_NUMBER: _ClassVar[int]
    context: Context
    draft: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[SparseDist]
    sampling: Sampling
    seed: int
    or_plain: bool
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., draft: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., seed: _Optional[int] = ..., or_plain: _Optional[bool] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("context_miss", "accepted", "tokens", "compute_seconds", "batch_sessions", "batch_tokens", "plain_after_len", "plain_after_fingerprint")
    CONTEXT_MISS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PLAIN_AFTER_LEN_FIELD_NUMBER: _ClassVar[int]
    PLAIN_AFTER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    context_miss: bool
    accepted: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    compute_seconds: float
    batch_sessions: int
    batch_tokens: int
    plain_after_len: int
    plain_after_fingerprint: int
    def __init__(self, context_miss: _Optional[bool] = ..., accepted: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., compute_seconds: _Optional[float] = ..., batch_sessions: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., plain_after_len: _Optional[int] = ..., plain_after_fingerprint: _Optional[int] = ...) -> None: ...

class VerifyTreeRequest(_message.Message):
    __slots__ = ("context", "tree", "sampling", "seed", "want_hidden")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WANT_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    context: Context
    tree: DraftTree
    sampling: Sampling
    seed: int
    want_hidden: bool
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., tree: _Optional[_Union[DraftTree, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., seed: _Optional[int] = ..., want_hidden: _Optional[bool] = ...) -> None: ...

class VerifyTreeResponse(_message.Message):
    __slots__ = ("context_miss", "accepted", "tokens", "compute_seconds", "hidden")
    CONTEXT_MISS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    context_miss: bool
    accepted: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    compute_seconds: float
    hidden: bytes
    def __init__(self, context_miss: _Optional[bool] = ..., accepted: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., compute_seconds: _Optional[float] = ..., hidden: _Optional[bytes] = ...) -> None: ...

class VerifyStringsRequest(_message.Message):
    __slots__ = ("context", "draft", "sampling", "seed")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    context: Context
    draft: _containers.RepeatedCompositeFieldContainer[StringDraft]
    sampling: Sampling
    seed: int
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., draft: _Optional[_Iterable[_Union[StringDraft, _Mapping]]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class VerifyStringsResponse(_message.Message):
    __slots__ = ("context_miss", "accepted", "tokens", "compute_seconds", "verified", "tree_nodes")
    CONTEXT_MISS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    context_miss: bool
    accepted: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    compute_seconds: float
    verified: int
    tree_nodes: int
    def __init__(self, context_miss: _Optional[bool] = ..., accepted: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., compute_seconds: _Optional[float] = ..., verified: _Optional[int] = ..., tree_nodes: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class KRow(_message.Message):
    __slots__ = ("k",)
    K_FIELD_NUMBER: _ClassVar[int]
    k: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, k: _Optional[_Iterable[int]] = ...) -> None: ...

class StrategyOptions(_message.Message):
    __slots__ = ("k", "k_matrix", "tree", "head_only")
    K_FIELD_NUMBER: _ClassVar[int]
    K_MATRIX_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    HEAD_ONLY_FIELD_NUMBER: _ClassVar[int]
    k: int
    k_matrix: _containers.RepeatedCompositeFieldContainer[KRow]
    tree: TreeShape
    head_only: bool
    def __init__(self, k: _Optional[int] = ..., k_matrix: _Optional[_Iterable[_Union[KRow, _Mapping]]] = ..., tree: _Optional[_Union[TreeShape, _Mapping]] = ..., head_only: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "chat", "session_id", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "strategy", "options", "request_id", "resume_from")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: Chat
    session_id: str
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    strategy: str
    options: StrategyOptions
    request_id: str
    resume_from: int
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ..., session_id: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., strategy: _Optional[str] = ..., options: _Optional[_Union[StrategyOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., resume_from: _Optional[int] = ...) -> None: ...

class TurnStarted(_message.Message):
    __slots__ = ("session_id", "request_id", "resumed_from")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    resumed_from: int
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., resumed_from: _Optional[int] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("session_id", "strategy", "finish_reason", "prompt_tokens", "new_tokens", "target_forwards", "drafted", "accepted", "mean_accepted_length", "acceptance_rate", "acceptance_by_position", "wall_seconds", "tokens_per_second", "draft_seconds", "verify_seconds", "network_seconds", "redis_seconds", "bytes_sent", "bytes_received", "failovers", "fallback_rounds", "replicas", "language", "drafter_pool", "adaptive", "ar_rounds", "mean_draft_length", "speculative_drafts", "speculative_hits", "speculative_ready", "speculative_verified", "round_trips", "chain_rounds", "speculative_plain", "speculative_continued", "overlapped_round_trips")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_BY_POSITION_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REDIS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_POOL_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    AR_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_DRAFT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_HITS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_READY_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    ROUND_TRIPS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_PLAIN_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_CONTINUED_FIELD_NUMBER: _ClassVar[int]
    OVERLAPPED_ROUND_TRIPS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    strategy: str
    finish_reason: str
    prompt_tokens: int
    new_tokens: int
    target_forwards: int
    drafted: int
    accepted: int
    mean_accepted_length: float
    acceptance_rate: float
    acceptance_by_position: _containers.RepeatedScalarFieldContainer[float]
    wall_seconds: float
    tokens_per_second: float
    draft_seconds: float
    verify_seconds: float
    network_seconds: float
    redis_seconds: float
    bytes_sent: int
    bytes_received: int
    failovers: int
    fallback_rounds: int
    replicas: _containers.RepeatedScalarFieldContainer[str]
    language: str
    drafter_pool: str
    adaptive: bool
    ar_rounds: int
    mean_draft_length: float
    speculative_drafts: int
    speculative_hits: int
    speculative_ready: int
    speculative_verified: int
    round_trips: int
    chain_rounds: int
    speculative_plain: int
    speculative_continued: int
    overlapped_round_trips: int
    def __init__(self, session_id: _Optional[str] = ..., strategy: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., new_tokens: _Optional[int] = ..., target_forwards: _Optional[int] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., mean_accepted_length: _Optional[float] = ..., acceptance_rate: _Optional[float] = ..., acceptance_by_position: _Optional[_Iterable[float]] = ..., wall_seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., draft_seconds: _Optional[float] = ..., verify_seconds: _Optional[float] = ..., network_seconds: _Optional[float] = ..., redis_seconds: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., failovers: _Optional[int] = ..., fallback_rounds: _Optional[int] = ..., replicas: _Optional[_Iterable[str]] = ..., language: _Optional[str] = ..., drafter_pool: _Optional[str] = ..., adaptive: _Optional[bool] = ..., ar_rounds: _Optional[int] = ..., mean_draft_length: _Optional[float] = ..., speculative_drafts: _Optional[int] = ..., speculative_hits: _Optional[int] = ..., speculative_ready: _Optional[int] = ..., speculative_verified: _Optional[int] = ..., round_trips: _Optional[int] = ..., chain_rounds: _Optional[int] = ..., speculative_plain: _Optional[int] = ..., speculative_continued: _Optional[int] = ..., overlapped_round_trips: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "stats", "started")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    delta: TextDelta
    stats: GenerationStats
    started: TurnStarted
    def __init__(self, delta: _Optional[_Union[TextDelta, _Mapping]] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ..., started: _Optional[_Union[TurnStarted, _Mapping]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...
