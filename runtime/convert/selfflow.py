"""Source format ``selfflow``: the ``black-forest-labs/Self-Flow`` release (per-token DiT)."""
from __future__ import annotations

import re

from runtime.convert.base import FLIP_TYPE, SourceFormat

LAYOUT = """\
* ``selfflow`` -- ``black-forest-labs/Self-Flow`` ``src/model.py`` (``SelfFlowPerTokenDiT``, loaded by
  ``sample.py:load_model`` with ``num_classes=1001, learn_sigma=True``): ``x_embedder.proj`` is a
  ``Linear(C*p*p, D)`` over tokens patchified ``b c (h p) (w q) -> b (h w) (c p q)`` (channel slowest) -> the
  same permutation as the conv; the output layer predicts (p, q, 2C) internally (its ``shufflechannel``
  reorders to (c, p, q) only outside the network) -> kept as is; the per-token blocks and final layer have
  the ordinary DiT keys; the 1001-row label table is 1000 classes + null row 1000 (no label dropout inside
  the embedder); ``projector.linear{1,2}`` (``SimpleHead`` D -> 2D -> D) is dropped, or kept with
  ``--keep-heads`` as the ``selfflow`` objective's projector under the same rule as REPA's. Its ``forward``
  takes RF time and returns ``-net(x, 1 - t)``: the network itself is SiT time -> ``sit_time_flip``.
"""

FORMAT = SourceFormat(name="selfflow", backbone_type=FLIP_TYPE, conv_embed=False, layout=LAYOUT,
                      weights_order=("model", "state_dict", "ema", "module"),  # sample.py:load_model
                      head_keys=re.compile(r"^projector\."), head_objective="selfflow")
