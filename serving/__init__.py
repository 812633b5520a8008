"""The Cortex chat server's parts: checkpoint loading, the batching engine, chat prompts and replies, the OpenAI API."""
