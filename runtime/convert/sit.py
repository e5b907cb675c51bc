"""Source format ``sit``: ``willisma/SiT`` (and ``facebookresearch/DiT``) checkpoints."""
from __future__ import annotations

from runtime.convert.base import FLIP_TYPE, SourceFormat

LAYOUT = """\
* ``sit`` -- ``willisma/SiT`` ``models.py`` (= ``facebookresearch/DiT`` ``models.py``): timm ``PatchEmbed``
  conv ``x_embedder.proj.weight`` ``(D, C, p, p)`` -> our ``Linear(P, D)`` over tokens in (ph, pw, c) order
  (``w.permute(0, 2, 3, 1).reshape(D, p*p*C)``); ``pos_embed`` ``(1, N, D)`` (a frozen parameter there, a
  buffer here); ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table`` (``num_classes + 1`` rows, null
  label last, when trained with label dropout), ``blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
  adaLN_modulation.1}``, ``final_layer.{adaLN_modulation.1, linear}``. ``learn_sigma=True`` (the default
  there): ``final_layer.linear`` has ``p*p*2C`` rows in (ph, pw, c) order, kept whole, the backbone uses the
  first ``C`` channels. SiT time: data at ``t = 1``, output ``data - noise`` -> backbone ``sit_time_flip``.
  (DiT's own released weights have this layout but are DDPM epsilon models, not velocity fields: converting
  them gives a well-formed but meaningless flow model.)
"""

FORMAT = SourceFormat(name="sit", backbone_type=FLIP_TYPE, conv_embed=True, layout=LAYOUT)
