"""What generation is given: the examples and the settings. Both generation (``generate``) and the
fingerprint of its output (``outputs``) read them, so they live below both."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

DEFAULT_SOURCE_LENGTH = 1024  # for a model that states no input limit

# generation-config fields a flag may override
GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "top_k",
                   "length_penalty", "no_repeat_ngram_size", "early_stopping", "repetition_penalty")


@dataclass
class Example:
    id: int
    source: str
    target: Optional[str] = None


@dataclass
class GenerateSettings:
    batch_size: int = 16
    max_source_length: int = DEFAULT_SOURCE_LENGTH
    source_prefix: str = ""
    dtype: str = "auto"  # float32 on CPU, bfloat16 on GPU
    static_cache: bool = False  # fixed-shape KV cache, so torch.compile need not recompile per length
    compile: bool = False
    generation: dict[str, Any] = field(default_factory=dict)  # overrides of the model's generation config
    progress: bool = True
    chat_template: bool = True  # decoder-only: wrap each source as a user turn when the tokenizer has a template
