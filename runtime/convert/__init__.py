"""Convert a published SiT / REPA / Self-Flow checkpoint into a zoo run directory:
``python -m runtime.convert SRC --to DIR --format sit|repa|selfflow`` (usage, output and key layouts in
:mod:`runtime.convert.cli`). One module per source format (:mod:`.sit`, :mod:`.repa`, :mod:`.selfflow`,
each a :class:`~runtime.convert.base.SourceFormat`); :mod:`.source` reads the file and the sizes it implies,
:mod:`.target` builds the converted spec, :mod:`.plan` maps the keys and writes the run."""
from __future__ import annotations

from runtime.convert.base import ConversionError, SourceFormat
from runtime.convert.cli import main
from runtime.convert.plan import ConversionPlan, convert, plan_conversion, write_run
from runtime.convert.repa import renumber_legacy_repa
from runtime.convert.source import (FORMATS, SourceArch, infer_arch, load_source, patch_embed_to_linear,
                                    strip_prefixes, unwrap)
from runtime.convert.target import DEFAULT_BASE_SPEC, build_spec

__all__ = ["DEFAULT_BASE_SPEC", "FORMATS", "ConversionError", "ConversionPlan", "SourceArch", "SourceFormat",
           "build_spec", "convert", "infer_arch", "load_source", "main", "patch_embed_to_linear", "plan_conversion",
           "renumber_legacy_repa", "strip_prefixes", "unwrap", "write_run"]
