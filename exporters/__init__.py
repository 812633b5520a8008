"""Cortex checkpoints in other runtimes' formats: a Hugging Face Qwen3-MoE directory (hf_dir) and a llama.cpp GGUF
file (gguf_file), both from one weight mapping (qwen3moe) and one chat template (chat_template)."""
