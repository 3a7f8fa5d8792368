"""Models on disk: base loading, adapters, merged exports and training runs as bases.

- ``loading``: ``load_base_lm`` (tiny / HF repo / local directory / export / run directory),
  ``checkpoint_info``, ``load_merged``, ``load_codec``, LoRA on the base linears, tiny Mimi;
- ``adapter``: ``adapter.safetensors`` + ``adapter.json``; ``write_merged`` / ``export_merged``;
- ``runs``: a ``moshi-ttt train`` run as a frozen base (LoRA merged, in memory);
- ``export``: ``export_run``, behind ``moshi-ttt export``.

This package builds on ``moshi_ttt.integration`` (the TTT layers), never the reverse.
"""
