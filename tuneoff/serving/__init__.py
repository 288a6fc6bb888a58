"""`tuneoff serve`: many LoRA adapters on one base model, behind an OpenAI-compatible HTTP API.

- catalog: which adapters may be served (names and folders checked, the registry resolved)
- model:   the base and the adapters resident on it (least recently used unloaded at the cap)
- engine:  one thread that batches requests, adapters mixed in a batch (PEFT `adapter_names`)
- api:     the FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /admin
"""
