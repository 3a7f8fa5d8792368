"""Models: where a model comes from (spec -> module), and the files it is stored in.

Modules, lowest first (each imports only those above it in this list):

- ``spec``: ``ModelSpec`` (source, file overrides, LoRA, memory, seed), ``LoadedModel`` (a
  module and where it comes from), ``resolve_device`` / ``resolve_dtype``;
- ``files``: safetensors / JSON checks and readers (no pickle is ever loaded);
- ``sources``: what a source string is (tiny / Hub repo / directory / export / run), read from
  config files only (``BaseRecord``);
- ``lora``, ``codec``: LoRA on the base linears; Mimi + tokenizer (tiny ones for tests);
- ``runs``: a training run on disk (checkpoints, recorded spec, trainable weights);
- ``build``: spec -> LoRA + memory on a base, parameter groups, ``meta_base``;
- ``adapter``: the adapter format and the merged-directory writer;
- ``load``: the one entry: ``load_base_lm``, ``build``, ``load_run``, ``load_adapter``, codecs;
- ``export``: a run or an adapter -> one merged directory (``moshi-ttt export``).
- ``provenance``: what a report records of a loaded model (source, run, checkpoint, step,
  sha256 of its weights files), from the ``Origin`` the loaders note on ``LoadedModel``.

Builds on ``moshi_ttt.integration`` (the TTT layers); never imports training, evaluation or
serving code.
"""

from .adapter import read_adapter, save_adapter, write_merged
from .export import export_merged, export_run
from .load import (
    build,
    codec_for_source,
    describe_base,
    describe_run,
    describe_spec,
    load_adapter,
    load_base_lm,
    load_codec,
    load_merged,
    load_run,
    load_run_base,
)
from .provenance import provenance, provenance_label
from .spec import LoadedModel, ModelSpec, Origin, resolve_device, resolve_dtype

__all__ = [
    "LoadedModel",
    "ModelSpec",
    "Origin",
    "build",
    "codec_for_source",
    "describe_base",
    "describe_run",
    "describe_spec",
    "export_merged",
    "export_run",
    "load_adapter",
    "load_base_lm",
    "load_codec",
    "load_merged",
    "load_run",
    "load_run_base",
    "provenance",
    "provenance_label",
    "read_adapter",
    "resolve_device",
    "resolve_dtype",
    "save_adapter",
    "write_merged",
]
