"""The add-ons: what running Qwen3 at real sizes needs, beside the core (qwen_embed.py), which knows
nothing of them. Each imports the core and plugs in at one named place.

    embedder.py     Embedder: qwen_embed.Qwen3Embedder with the add-ons below
    runtime.py      device, dtype, memory, the out-of-memory batch runner, compile, varlen attention
    weights.py      weights as shipped, int8, int4, guarded float16, the streamed reference
    embed_cache.py  the vector cache, keyed by what changes a vector
    fingerprint.py  the code a vector reaches (found from the code) and the weights' content
    lora.py         LoRA adapters on the frozen linear layers
    torchrun.py     many processes, one job
"""
