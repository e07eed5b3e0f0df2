"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types).

Strict mode: "5" is not an int and 1.0 is not a count, so a wrong type is a 400, not a
silent coercion. Unknown fields are ignored (clients send many optional ones), but fields
that would change the answer and are not implemented (logprobs, tools, penalties other
than repetition_penalty, ...) are refused by `unsupported()` with a message naming them.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..util.pool_modes import MODES

TokenIds = list[int]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    # field -> value that means "not used"; anything else is refused
    UNSUPPORTED: ClassVar[dict] = {}

    def unsupported(self) -> Optional[str]:
        """The first field set to something this server does not implement, or None."""
        for name, neutral in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and value != neutral:
                return name
        return None


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str], TokenIds, list[TokenIds]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None
    # extensions (pass with extra_body): how the retrieval LoRA expects its inputs
    # (default: as the adapter was trained, rag.EMBEDDING_FILE; else "query: " and last)
    prefix: Optional[str] = None
    pooling: Optional[Literal[MODES]] = None
    normalize: bool = True


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Union[None, str, list[str]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # extensions (vLLM spells them the same way)
    top_k: int = 0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    logprobs: Union[None, bool, int] = None
    UNSUPPORTED: ClassVar[dict] = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {},
                                   "logprobs": False}


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    UNSUPPORTED: ClassVar[dict] = dict(_Sampling.UNSUPPORTED, echo=False, best_of=1, suffix="")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    UNSUPPORTED: ClassVar[dict] = dict(_Sampling.UNSUPPORTED, tools=[], tool_choice="none",
                                       response_format={"type": "text"})


class RAGRequest(_Body):
    question: str
    k: Optional[int] = None
    max_tokens: Optional[int] = None


class AdapterLoadRequest(_Body):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    path: str = Field(min_length=1)
