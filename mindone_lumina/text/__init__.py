"""The prompt encoders: one decoder-only stack (``decoder``) with Gemma (Lumina-Next) and LLaMA (Lumina-T2I) configs,
their tokenizers and prompt encoding."""
