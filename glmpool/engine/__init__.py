"""ChatGLM-6B engine: checkpoint reading, model, tokenizer, quantization, generation.

Self-contained: it knows nothing of files of the spool or of processes.

## API
```python
from glmpool.engine import load, SamplingParams, EngineError, PromptTooLongError, AdmissionError
engine = load(model, device="cpu", dtype=None, cache_dir=None, quantize=None, progress=True,
              matmul="reference", revision=None)
#   model: local dir | hub id | "tiny-random" (built once into cache_dir, answers are noise)
#   cache_dir: None: the standard Hugging Face cache (and ./.cache, where the original server kept models)
#   revision: the hub revision (None: main)
#   device: "cpu" | "cuda" | "cuda:N"; dtype: None (float16 on GPUs, float32 on the CPU) | "float32" | ...
#   quantize: None | 4 | 8 | "4-qe" | "8-qe" (-qe: the embeddings = output projection too)
#   matmul (CPU fp32 only): one of glmpool.engine.linear.registry.MATMULS, each described there
engine.config          # ModelConfig dataclass (hidden_size, num_layers, ... from config.json)
engine.tokenizer       # .encode(text)->list[int], .decode(ids)->str, .build_prompt(query, history)->list[int]
engine.chat(query, history=None, max_length=2048, do_sample=True, top_p=0.7, temperature=0.95, seed=None) -> (response, history)
engine.stream_chat(...)  # yields (partial_response, history)

params = SamplingParams(do_sample=True, top_p=0.7, temperature=0.95, top_k=50,
                        max_length=2048, max_new_tokens=None, seed=None)   # validated in __post_init__ (ValueError)
batch = engine.batcher(max_batch=16, max_kv_tokens=None, shared_cache=None)   # continuous batching; one per
                         # worker; shared_cache: one KV slab, batched decode attention (default: off the
                         # CPU, and on it where load() found the padding exact)
batch = engine.batcher(..., static=None, compile=True, backend=None)  # static: the GPU path (static_decode.py:
                         # static KV cache, compiled bucketed decode steps, sampling on the device, chunked
                         # prefill; default on GPUs); batch.warm_up() compiles every bucket now -> seconds
batch.add(key, query, history, params)   # prefill happens in the next step(); raises
                                         #   AdmissionError (no room now: retry later, nothing changed),
                                         #   PromptTooLongError / ValueError (permanent: report as error)
batch.add_prompt(key, token_ids, params)  # the same for a prompt already tokenized (build_prompt's output)
events = batch.step()    # advances every running sequence by one token (new ones are prefilled first);
                         # -> list[TokenEvent], one per sequence that produced a token this step:
                         #   TokenEvent(key, token_id, render, finished, finish_reason, prompt_tokens, generated_tokens)
                         #   .text = post-processed response so far (as THUDM's stream_chat: never ends in a cut
                         #   char), decoded when first read
                         #   finish_reason in {None, "stop", "length", "cancelled"}
batch.cancel(key) -> TokenEvent | None   # finished event with finish_reason "cancelled", cache freed at once
len(batch); batch.keys(); batch.has_room(prompt_tokens, params) -> bool
```
Errors all derive from `EngineError`, each with a one-line human message.
`glmpool.engine.tiny.write_tiny_checkpoint(path, layers=2, hidden=64, heads=4, inner=None, vocab=1024, seed=0,
safetensors=False, quantize=None, max_sequence_length=2048, shards=1, dtype=torch.float16)` writes a random-weight checkpoint in THUDM's
exact layout (used by `glmpool tiny-model DIR ...`).
"""
import importlib

# Imported on first use (PEP 562), so that glmpool.engine.linear.registry, the names of the ways a weight
# is multiplied, can be read without torch (the supervisor never imports it).
_EXPORTS = {"load": "api", "Engine": "api", "ModelConfig": "config", "ChatGLMTokenizer": "tokenizer",
            "Batcher": "generate", "SamplingParams": "generate", "TokenEvent": "generate",
            "EngineError": "errors", "CheckpointError": "errors", "ModelNotFoundError": "errors",
            "PromptTooLongError": "errors", "AdmissionError": "errors"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
